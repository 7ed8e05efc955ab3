"""app/memory.py: malloc's free memory goes back to the OS, which is what keeps the service's RSS from creeping
under a long soak (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.memory import _malloc_trim, release_free_heap


def anon_rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["RssAnon"].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists() or _malloc_trim() is None, reason="glibc on Linux only")
def test_free_memory_held_by_malloc_is_returned() -> None:
    # 150 MB in 4 KB blocks (malloc, not Python's small-object allocator), then all but every 64th freed: the
    # survivors pin the heap, so malloc keeps the freed pages (RSS stays) until it is told to trim.
    blocks = [bytearray(4096) for _ in range(150 * 256)]
    survivors = blocks[::64]
    del blocks
    held = anon_rss_mb()
    assert release_free_heap()
    assert anon_rss_mb() < held - 100, "malloc_trim should return the ~145 MB of freed blocks"
    assert all(len(b) == 4096 for b in survivors)  # what is in use is untouched
