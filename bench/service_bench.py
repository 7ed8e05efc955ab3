"""Service benchmark: the service, a naive baseline server and each runtime's model-only throughput, in one run.

1. Model-only img/s of every available runtime at batch 1 / 8 / 32 (same weights, same preprocessed inputs):
   the ceiling each runtime sets, measured in this run so ratios hold on a noisy shared machine.
2. The batch build of the corpus (`retrieval index build`'s own code), images/s, beside the model-only figure
   of the runtime it used.
3. `retrieval serve` with its defaults and the naive server (bench/naive_server.py: FastAPI + timm, one eager
   torch forward per request, faiss Flat; same weights, index and rows), under 1 / 8 / 32 concurrent clients
   posting real JPEGs to /v1/search: queries/s, p50, p99, errors, for two query sets: small JPEGs (cub100 crops,
   227 px) and 12-megapixel photos (cub100 crops enlarged to 4000x3000 with film grain, JPEG q 90).

The load comes from wrk (Debian package `wrk`; C, one thread, closed loop: each connection sends its next query
when the last is answered), so the client costs the 2-core machine little. The corpus is cub100 from ../shared
(synthetic images when it is absent, said in the output).

    .venv/bin/python bench/service_bench.py                           # Lite0 on CPU, ~12 min
    .venv/bin/python bench/service_bench.py --embedder efficientnet_lite012_gem --seconds 10
    python3 bench/service_bench.py --device cuda --clients 32,128,256 --variant workers=8   # on a GPU machine

On CUDA the model-only rows are eager torch fp32 NCHW, the service's torch runner (bf16 autocast, channels_last)
and ONNX Runtime (its CUDA provider when onnxruntime-gpu is installed), at batch 1 / 8 / 32 / 128; the naive
server runs its forward pass on the GPU too.

Not a test: it prints Markdown tables (and --json writes every row).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.live_server import LiveServer  # noqa: E402 - after the repo is on sys.path
from tests.postgres import free_port  # noqa: E402

CUB = REPO.parent / "shared" / "data" / "cub100" / "images"

WRK_SCRIPT = r"""
local bodies = {}
local boundary = "----service-bench-boundary"
init = function(args)
  for _, path in ipairs(args) do
    local f = assert(io.open(path, "rb"))
    local data = f:read("*all")
    f:close()
    bodies[#bodies + 1] = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n10\r\n"
      .. "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
      .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
end
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/search",
    {["Content-Type"] = "multipart/form-data; boundary=" .. boundary}, bodies[(n % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def photo_jpeg(source: Path, size: tuple[int, int], seed: int) -> bytes:
    """A 12-megapixel 'phone photo': a real image enlarged, with sensor-like grain so it compresses like one."""
    rng = np.random.default_rng(seed)
    image = Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_jpeg(rng: np.random.Generator, size: int = 227) -> bytes:
    base = rng.integers(0, 255, size=3).astype(np.float32)
    img = np.tile(base, (size, size, 1))
    period = int(rng.integers(6, 40))
    img[:, (np.arange(size) // period) % 2 == 1] *= 0.6
    img += rng.normal(0, 20, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def prepare_images(root: Path, corpus_size: int, small: int, photos: int) -> tuple[Path, list[Path], list[Path], str]:
    """(corpus folder, small query files, 12-MP query files, where the images came from)."""
    corpus, small_dir, photo_dir = root / "corpus", root / "queries-small", root / "queries-12mp"
    for d in (corpus, small_dir, photo_dir):
        d.mkdir(parents=True, exist_ok=True)
    if CUB.is_dir():
        files = sorted(CUB.rglob("*.jpg"))
        rng = np.random.default_rng(0)
        order = rng.permutation(len(files))
        chosen = [files[i] for i in order[: corpus_size + small]]
        for path in chosen[:corpus_size]:
            (corpus / path.parent.name).mkdir(exist_ok=True)
            shutil.copy(path, corpus / path.parent.name / path.name)
        queries = chosen[corpus_size:]
        origin = f"cub100 ({CUB})"
    else:
        rng = np.random.default_rng(0)
        for i in range(corpus_size):
            (corpus / f"class{i % 10}").mkdir(exist_ok=True)
            (corpus / f"class{i % 10}" / f"{i}.jpg").write_bytes(synthetic_jpeg(rng))
        queries = []
        for i in range(small):
            path = small_dir / f"synthetic-{i}.jpg"
            path.write_bytes(synthetic_jpeg(rng))
            queries.append(path)
        origin = "synthetic images (../shared/data/cub100 is absent)"
    small_files = []
    for i, path in enumerate(queries[:small]):
        target = small_dir / f"{i:03d}.jpg"
        shutil.copy(path, target)
        small_files.append(target)
    photo_files = []
    for i, path in enumerate(queries[:photos]):
        target = photo_dir / f"{i:03d}.jpg"
        target.write_bytes(photo_jpeg(path, (4000, 3000), seed=i))
        photo_files.append(target)
    return corpus, small_files, photo_files, origin


# "torch channels_last" is the service's torch runner: fp32 on CPU, bf16 autocast on CUDA (the precision column).
RUNTIME_LABELS = {"cpu": ["torch fp32 NCHW", "torch channels_last", "onnxruntime fp32", "openvino fp32",
                          "openvino default precision"],
                  "cuda": ["torch fp32 NCHW", "torch channels_last", "onnxruntime fp32"]}
BATCHES = {"cpu": [1, 8, 32], "cuda": [1, 8, 32, 128]}


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def model_only(checkpoint: Path, label: str, batch_sizes: list[int], seconds: float, threads: int,
               device_name: str = "cpu") -> dict:
    """img/s of one runtime (`label`) on the checkpoint's weights, at each batch size; run in a child process.
    Inputs start in host memory, as a server's do, and every pass ends with its embeddings back on the host."""
    import torch

    from models.checkpoint import load_checkpoint
    from models.export import ensure_onnx, export_dir
    from models.runtime import OnnxRuntimeRunner, OpenVinoRunner, TorchRunner, synthetic_probe

    device = torch.device(device_name)
    embedder = load_checkpoint(checkpoint).eval()
    config = embedder.config

    class EagerNCHW:  # what the naive server (and this service before the runtime layer) runs
        info = type("Info", (), {"precision": "fp32", "device": device_name})()

        def __init__(self) -> None:
            self.model = embedder.to(device)  # one label per child process: nothing else uses this copy

        def run(self, pixels: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return self.model(pixels.to(device)).cpu().numpy()

    makers = {"torch fp32 NCHW": EagerNCHW,
              "torch channels_last": lambda: TorchRunner(embedder, device),
              "onnxruntime fp32": lambda: OnnxRuntimeRunner(ensure_onnx(embedder, export_dir(checkpoint)), config,
                                                            device, threads),
              "openvino fp32": lambda: OpenVinoRunner(ensure_onnx(embedder, export_dir(checkpoint)), config, "fp32",
                                                      threads),
              "openvino default precision": lambda: OpenVinoRunner(ensure_onnx(embedder, export_dir(checkpoint)),
                                                                   config, "reduced", threads)}
    try:
        runner = makers[label]()
    except ImportError as exc:
        return {"runtime": label, "missing": str(exc)}
    # The device as the runner reports it: ONNX Runtime asked for CUDA without its GPU provider says "cuda (cpu)".
    row: dict = {"runtime": label, "precision": runner.info.precision, "device": runner.info.device,
                 "batches": batch_sizes}
    for b in batch_sizes:
        pixels = synthetic_probe(config, b, seed=b)
        runner.run(pixels)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            runner.run(pixels)
            done += b
        row[f"b{b}"] = done / (time.perf_counter() - start)
    return row


def run_wrk(url: str, files: list[Path], clients: int, seconds: float, script: Path) -> dict:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--timeout", "60s", "-s", str(script), url, "--",
               *map(str, files)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    ok = result["requests"] - result["errors"]
    return {"qps": ok / (result["duration_us"] / 1e6), "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000, "errors": result["errors"], "requests": result["requests"]}


def start_naive(data_dir: Path, checkpoint: Path, log: Path, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ) | {"RETRIEVAL_DATA_DIR": str(data_dir), "NAIVE_MODEL_DIR": str(checkpoint),
                              "NAIVE_DEVICE": device}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.naive_server:app", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"naive server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("naive server not ready in 180 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of load per level")
    parser.add_argument("--corpus", type=int, default=1000, help="images in the index")
    parser.add_argument("--embedder", default="efficientnet_lite0", help="preset name or checkpoint dir")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the service, the build, the naive server and the model-only runs compute")
    parser.add_argument("--model-seconds", type=float, default=3, help="seconds per model-only measurement")
    parser.add_argument("--sets", default="small,12mp", help="query sets to run")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for retrieval serve")
    parser.add_argument("--variant", action="append", default=[],
                        help="one more `retrieval serve` measured in the same run, as KEY=VALUE[,KEY=VALUE...] "
                             "over --server-env (the key `workers` gives uvicorn's --workers), e.g. "
                             "RETRIEVAL_RUNTIME=onnxruntime or workers=2")
    parser.add_argument("--json", help="also write every row here")
    parser.add_argument("--model-only", help=argparse.SUPPRESS)  # child process: measure one runtime
    parser.add_argument("--runtime-label", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_only:
        row = model_only(Path(args.model_only), args.runtime_label, BATCHES[args.device], args.model_seconds,
                         len(os.sched_getaffinity(0)), args.device)
        print("MODEL " + json.dumps(row), flush=True)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk): it generates the load", file=sys.stderr)
        return 2

    from app.db.migrate import upgrade
    from app.db.models import ModelVersion
    from app.db.session import session_scope
    from app.registry import active_index
    from app.settings import Settings

    chosen_sets = [s for s in args.sets.split(",") if s]
    unknown = sorted(set(chosen_sets) - {"small", "12mp"})
    if unknown:
        print(f"unknown query set(s) {', '.join(unknown)}: choose from small, 12mp", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="service-bench-"))
    # The 12-MP photos take ~15 s to make: only when they are measured.
    corpus, small, photos, origin = prepare_images(root, args.corpus, small=64,
                                                   photos=16 if "12mp" in chosen_sets else 0)
    photo_mb = f" (mean {np.mean([p.stat().st_size for p in photos]) / 1e6:.1f} MB)" if photos else ""
    print(f"corpus: {args.corpus} images from {origin}; queries: {len(small)} small JPEGs, {len(photos)} "
          f"12-MP photos{photo_mb}", flush=True)
    data_dir = root / "data"
    settings = Settings(data_dir=data_dir, embedder=args.embedder, device=args.device)
    data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    env = dict(os.environ) | {"RETRIEVAL_DATA_DIR": str(data_dir), "RETRIEVAL_EMBEDDER": args.embedder,
                              "RETRIEVAL_DEVICE": args.device}
    env |= dict(item.split("=", 1) for item in args.server_env)
    # Runtimes run in child processes only (the build, the model-only runs, the servers): this one just measures.
    build = subprocess.run([sys.executable, "-m", "app.cli", "index", "build", str(corpus)], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True)
    build_line = next(line for line in build.stdout.splitlines() if line.startswith("embedded "))
    build_img_s = float(build_line.split(": ")[-1].split()[0])
    with session_scope(settings.resolved_database_url) as session:
        checkpoint = Path(session.get(ModelVersion, active_index(session).model_version_id).path)
    threads = len(os.sched_getaffinity(0))
    print(f"build: {build_line}", flush=True)

    print("model-only img/s:", flush=True)
    model_rows: list[dict] = []
    rows: list[dict] = []

    def save_json() -> None:  # after every row: a run cut short by its time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps({"model_only": model_rows, "service": rows,
                                                   "build_img_s": build_img_s}, indent=2))

    batches = BATCHES[args.device]
    for label in RUNTIME_LABELS[args.device]:
        if label.startswith("onnxruntime") and args.device == "cuda" and not onnxruntime_has_cuda():
            print(f"  {label}: skipped, this onnxruntime has no CUDA provider (it would measure the CPU)",
                  flush=True)
            continue
        child = subprocess.run([sys.executable, __file__, "--model-only", str(checkpoint), "--runtime-label", label,
                                "--model-seconds", str(args.model_seconds), "--device", args.device], cwd=REPO,
                               capture_output=True, text=True)
        line = next((x for x in child.stdout.splitlines() if x.startswith("MODEL ")), None)
        if line is None:
            print(f"  {label}: failed\n{child.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(line[6:])
        if row.get("missing"):
            print(f"  {label}: not installed ({row['missing']})", flush=True)
            continue
        model_rows.append(row)
        save_json()
        print(f"  {label:<30} " + "  ".join(f"b={b}: {row[f'b{b}']:6.1f}" for b in batches), flush=True)
    best = max(((max(r[f"b{b}"] for b in batches), r["runtime"]) for r in model_rows), default=(float("nan"), "none"))

    script = root / "search.lua"
    script.write_text(WRK_SCRIPT)
    levels = [int(c) for c in args.clients.split(",")]
    sets = {"small": small, "12mp": photos}
    servers: list[tuple[str, dict[str, str]]] = [("retrieval serve", {})]
    servers += [(f"retrieval serve {variant}", dict(item.split("=", 1) for item in variant.split(",")))
                for variant in args.variant]
    servers += [] if args.skip_naive else [("naive", {})]
    for server_name, overrides in servers:
        log = root / f"{len(rows)}-{server_name.split()[0]}.log"
        if server_name == "naive":
            proc, url = start_naive(data_dir, checkpoint, log, args.device)
            stop = proc.terminate
            served = f"torch fp32 NCHW ({args.device})"
        else:
            workers = overrides.pop("workers", "1")
            live = LiveServer(env | overrides, log, ["--log-level", "warning", "--workers", workers]).start(
                timeout=300)
            url, stop = live.base_url, live.stop
            ready = httpx.get(f"{url}/readyz").json()["detail"]
            served = f"{ready['runtime']} {ready['precision']}"
            print(f"  {server_name}: {served} on {ready['device']}, index searched on {ready['index_device']}",
                  flush=True)
        try:
            for set_name in chosen_sets:
                run_wrk(url, sets[set_name], 4, 3, script)  # warm-up, not measured
                for clients in levels:
                    result = run_wrk(url, sets[set_name], clients, args.seconds, script)
                    result.update(server=server_name, served=served, set=set_name, clients=clients)
                    rows.append(result)
                    save_json()
                    print(f"  {server_name:<16} {set_name:<5} {clients:>3} clients: {result['qps']:7.1f} q/s  "
                          f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
                          f"errors {result['errors']}", flush=True)
        finally:
            stop()

    print(f"\nmodel {args.embedder}, {args.corpus}-image corpus, {args.device} ({threads} CPU cores), wrk closed "
          f"loop, {args.seconds:.0f} s per level\n")
    print("| runtime | precision | device | " + " | ".join(f"b={b}" for b in batches) + " |")
    print("|---|---|---|" + "--:|" * len(batches))
    for r in model_rows:
        print(f"| {r['runtime']} | {r['precision']} | {r['device']} | "
              + " | ".join(f"{r[f'b{b}']:.0f}" for b in batches) + " |")
    print(f"\nbuild: {build_line}\n")
    print("| query set | clients | server | runtime | queries/s | p50 ms | p99 ms | errors | x naive | "
          "x best model-only |")
    print("|---|--:|---|---|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        naive = next((r for r in rows if r["server"] == "naive" and r["set"] == row["set"]
                      and r["clients"] == row["clients"]), None)
        ratio = f"{row['qps'] / naive['qps']:.2f}" if naive and naive["qps"] else "-"
        print(f"| {row['set']} | {row['clients']} | {row['server']} | {row['served']} | {row['qps']:.1f} | "
              f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} | {ratio} | {row['qps'] / best[0]:.2f} |")
    print(f"\nbest model-only: {best[0]:.0f} img/s ({best[1]})")
    save_json()
    return 0


if __name__ == "__main__":
    sys.exit(main())
