"""A train job on several processes (job param `nproc` > 1): the worker starts
`torchrun --standalone --nproc_per_node N -m app.worker.torchrun_train SPEC` and follows it.

models.train does the DDP part (one process group, the global batch for the losses and the cross-batch memory,
rank 0 writes checkpoints and log.jsonl). The worker relays log.jsonl lines as job progress, asks the ranks to
stop by creating a file (models.train stops every rank when any rank's should_stop is true) and reads the result
rank 0 writes. A re-run after a crash resumes from the same out_dir like a one-process job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.worker.context import JobContext

SPEC_FILE, RESULT_FILE, STOP_FILE, LOG = "torchrun-spec.json", "torchrun-result.json", "torchrun-stop", "torchrun.log"


def train_under_torchrun(ctx: JobContext, config: Any, train_items: list, val_items: list, out_dir: Path,
                         init: str | None, nproc: int,
                         on_record: Callable[[dict[str, Any]], None]) -> tuple[Any, int]:
    """models.train.train() in `nproc` processes under torchrun: (its TrainResult from rank 0, the world size)."""
    from models.train import LOG_FILE, TrainResult

    run_dir = ctx.dir / "torchrun"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, RESULT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    spec = {"config": config.to_dict(), "train": train_items, "val": val_items, "out_dir": str(out_dir),
            "init": init, "stop_file": str(run_dir / STOP_FILE), "result_file": str(run_dir / RESULT_FILE)}
    (run_dir / SPEC_FILE).write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "app.worker.torchrun_train", str(run_dir / SPEC_FILE)]
    ctx.log(f"training on {nproc} processes: {' '.join(command)}")
    with open(run_dir / LOG, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # settings travel in the env
    seen = 0
    while True:
        done = proc.poll() is not None
        log_path = out_dir / LOG_FILE
        if log_path.exists():
            lines = log_path.read_text().splitlines()
            for line in lines[seen:]:
                on_record(json.loads(line))
            seen = len(lines)
        if done:
            break
        if ctx.should_stop():
            (run_dir / STOP_FILE).touch()
        time.sleep(0.5)
    if proc.returncode != 0:
        tail = (run_dir / LOG).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{tail}")
    result = json.loads((run_dir / RESULT_FILE).read_text())
    return TrainResult(Path(result["best"]), Path(result["last"]) if result["last"] else None, result["metrics"],
                       result["step"], result["stopped"]), int(result["world_size"])


def main(spec_path: str) -> None:
    """One rank: the spec's training, with the worker's settings (RETRIEVAL_* in the environment)."""
    import torch.distributed as dist

    from app.images import file_loader
    from app.settings import get_settings
    from models.config import TrainConfig
    from models.train import train

    spec = json.loads(Path(spec_path).read_text())
    settings = get_settings()
    stop_file = Path(spec["stop_file"])
    result = train(TrainConfig.from_dict(spec["config"]), [tuple(i) for i in spec["train"]],
                   [tuple(i) for i in spec["val"]], spec["out_dir"], file_loader(settings),
                   init_checkpoint=spec["init"], device=settings.device, should_stop=stop_file.exists)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = Path(spec["result_file"] + ".tmp")
        tmp.write_text(json.dumps({"best": str(result.best_checkpoint_dir), "step": result.step,
                                   "last": str(result.last_checkpoint_dir) if result.last_checkpoint_dir else None,
                                   "metrics": result.metrics, "stopped": result.stopped, "world_size": world}))
        tmp.replace(spec["result_file"])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
