"""The cub100 quality rows (docs/quality.md): off-the-shelf EfficientNet-Lite0, then each training config.

Reads /work/shared/data/cub100 (or --data-root); skips with a message when it is absent. Training rows run as
separate processes (`python -m app.cli train --config ...`, i.e. `retrieval train`), several at once
with --parallel (one GPU has room for all of them). Writes <out>/results.json and prints a markdown table.

    python bench/quality.py                                   # all rows, full configs
    python bench/quality.py --steps 100 --rows irt irt_nokoleo # shortened (CPU)
    python bench/quality.py --pretrained .cub/lite0_fp16.safetensors   # Lite0 weights from a local file
    python bench/quality.py --rows off_the_shelf_lite01 irt_lite01 --workers 1   # the CPU rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_ROOT = Path("/work/shared/data/cub100")
# Off-the-shelf rows: a zoo preset evaluated as shipped.
PRESET_ROWS = {
    "off_the_shelf": "efficientnet_lite0",
    "off_the_shelf_gem": "efficientnet_lite0_gem",
    "off_the_shelf_lite01": "efficientnet_lite01_gem",
    "off_the_shelf_lite012": "efficientnet_lite012_gem",
}
# Training rows: a config trained by models.train, its best-on-validation checkpoint evaluated on the test split.
CONFIG_ROWS = {
    "irt": "configs/irt_cub100.yaml",
    "irt_nokoleo": "configs/irt_nokoleo_cub100.yaml",
    "abe": "configs/abe_cub100.yaml",
    "abe_nodiv": "configs/abe_nodiv_cub100.yaml",
    "proxy_anchor": "configs/proxy_anchor_cub100.yaml",
    "irt_gem_late": "configs/irt_gem_late_cub100.yaml",
    "irt_lite01": "configs/irt_lite01_cub100.yaml",
    "irt_lite01_nokoleo": "configs/irt_lite01_nokoleo_cub100.yaml",
    "irt_lite012": "configs/irt_lite012_cub100.yaml",
}
ROWS = [*PRESET_ROWS, *CONFIG_ROWS]
KS = (1, 2, 4, 8)


def off_the_shelf(preset: str, root: Path, pretrained: str | None, device: str, workers: int) -> dict:
    from app.images import file_loader
    from app.settings import get_settings
    from models.data import cub_items, select_classes
    from models.embedder import EmbedderConfig, resolve_device
    from models.evaluate import evaluate_items
    from models.zoo import PRESETS, create_embedder

    config = EmbedderConfig.from_dict(PRESETS[preset].to_dict())
    if pretrained and config.arch != "ensemble":  # one weights file can only stand in for a single trunk
        config.pretrained = pretrained
    dev = resolve_device(device)
    embedder = create_embedder(config).to(dev)
    test = select_classes(cub_items(root), 50, 100)
    return {
        "test": evaluate_items(
            embedder, test, file_loader(get_settings()), KS, batch_size=128, num_workers=workers, device=dev
        ),
        "num_test": len(test),
    }


def train_command(config: str, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "app.cli", "train", "--config", config, "--out", str(out), "--device", args.device]
    cmd += ["--set", f"data.root={args.data_root}"]
    if args.steps:
        cmd += ["--set", f"steps={args.steps}", "--set", f"eval_every={max(args.steps // 10, 1)}"]
        cmd += ["--set", f"warmup_steps={max(args.steps // 20, 1)}"]
    if args.pretrained:
        cmd += ["--set", f"embedder.pretrained={args.pretrained}"]  # single-trunk configs only
    if args.workers is not None:
        cmd += ["--set", f"num_workers={args.workers}"]
    for item in args.set or []:
        cmd += ["--set", item]
    return cmd


def table(results: dict[str, dict]) -> str:
    lines = ["| row | R@1 | R@2 | R@4 | R@8 | MAP@R | val MAP@R | steps |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if "test" not in res:
            lines.append(f"| {name} | failed: {res.get('error', '?')} |||||||")
            continue
        t = res["test"]
        val = res.get("val", {}).get("map@r")
        cells = [f"{100 * t[f'recall@{k}']:.1f}" for k in KS] + [f"{100 * t['map@r']:.1f}"]
        cells.append(f"{100 * val:.1f}" if val is not None else "-")
        cells.append(str(res.get("step", 0)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    parser.add_argument("--steps", type=int, help="shorten every training row to this many steps")
    parser.add_argument("--pretrained", help="override the EfficientNet-Lite0 weights source (a local file)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, help="data-loading workers per training process")
    parser.add_argument("--parallel", type=int, default=1, help="training processes at once")
    parser.add_argument("--set", action="append", help="extra KEY=VALUE override for every training row")
    args = parser.parse_args(argv)

    if not (args.data_root / "images.txt").is_file():
        print(f"SKIP: no cub100 data at {args.data_root} (CUB-style images.txt expected); nothing measured.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    running: list[tuple[str, subprocess.Popen, Path, float]] = []
    pending = [r for r in args.rows if r in CONFIG_ROWS]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def launch(name: str) -> None:
        out = args.out / name
        log = (args.out / f"{name}.log").open("w")
        cmd = train_command(CONFIG_ROWS[name], out, args)
        results[name] = {"command": " ".join(cmd[1:])}
        running.append(
            (name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), out, time.time())
        )

    while pending and len(running) < args.parallel:
        launch(pending.pop(0))
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    for name in [r for r in args.rows if r in PRESET_ROWS]:
        start = time.time()
        results[name] = off_the_shelf(PRESET_ROWS[name], args.data_root, args.pretrained, args.device, workers)
        results[name]["seconds"] = round(time.time() - start, 1)
        print(f"{name}: done in {results[name]['seconds']} s", flush=True)
    while running:
        for entry in list(running):
            name, proc, out, start = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            metrics_file = out / "test_metrics.json"
            if proc.returncode == 0 and metrics_file.is_file():
                results[name].update(json.loads(metrics_file.read_text()))
            else:
                results[name]["error"] = f"exit {proc.returncode}, see {args.out / (name + '.log')}"
            results[name]["seconds"] = round(time.time() - start, 1)
            print(f"{name}: done in {results[name]['seconds']} s", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))  # partial results survive a kill
            if pending:
                launch(pending.pop(0))
        time.sleep(2)
    ordered = {r: results[r] for r in args.rows if r in results}
    (args.out / "results.json").write_text(json.dumps(ordered, indent=2))
    print(table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
