"""Soak probe, loaded into the soak's server only (bench/soak.py --probe puts this folder on its PYTHONPATH):
a daemon thread writes one JSON line every SOAK_PROBE_S seconds to SOAK_PROBE_LOG with what tells native heap
growth from Python heap growth and from allocator retention:

- glibc's mallinfo2: bytes malloc has handed out and not freed (`in_use`: small chunks + mmapped), bytes it holds
  free (`free`), and the number of malloc arenas (from malloc_info);
- Python's own allocator: sys.getallocatedblocks() (live Python objects' blocks), gc-tracked objects;
- live threads.
Not part of the service: it only reads.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _sample(libc: ctypes.CDLL) -> dict[str, float]:
    info = libc.mallinfo2()
    arenas = 0
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        handle = libc.fopen(out.name.encode(), b"w")
        libc.malloc_info(0, handle)
        libc.fclose(handle)
        arenas = open(out.name).read().count("<heap nr=")
    return {"t": time.time(), "pid": os.getpid(), "in_use_mb": (info.uordblks + info.hblkhd) / 2**20,
            "free_mb": info.fordblks / 2**20, "mmapped_mb": info.hblkhd / 2**20, "arenas": arenas,
            "py_blocks": sys.getallocatedblocks(), "gc_objects": len(gc.get_objects()),
            "threads": threading.active_count()}


def _run(path: str, every: float) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    while True:
        with open(path, "a") as log:
            log.write(json.dumps(_sample(libc)) + "\n")
        time.sleep(every)


if os.environ.get("SOAK_PROBE_LOG"):
    threading.Thread(target=_run, args=(os.environ["SOAK_PROBE_LOG"], float(os.environ.get("SOAK_PROBE_S", "10"))),
                     name="soak-probe", daemon=True).start()
