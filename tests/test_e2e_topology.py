"""The docker-compose topology, run without Docker: the same roles as separate processes, wired the same way.

    postgres  -> the tests' real PostgreSQL server (Debian's binaries; compose uses the postgres:15 image)
    migrate   -> `retrieval db upgrade head`               (one-shot, must exit 0)
    api       -> `retrieval serve`                         (uvicorn, HTTP on loopback)
    worker    -> `retrieval worker`                        (claims jobs from PostgreSQL)
    indexer   -> `retrieval index build /corpus`           (the batch profile, run while api and worker are up)

All of them get their configuration only from RETRIEVAL_* environment variables, as in docker-compose.yml, share
one data directory (the `data` volume) and one PostgreSQL database. Through HTTP: the api starts with no index
(live, not ready), hot-swaps to the index the batch job publishes, answers a query, refuses a training job
without an API key (auth is on, as in compose) and accepts it with a key made the way docs/deployment.md says; the
worker runs and promotes it, and the api then serves the new model. The Dockerfile's HEALTHCHECK command is run against
the live api. A tiny random-init embedder (resnet10t, 64 px, 64-d) keeps it quick on two CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.postgres import free_port

REPO = Path(__file__).resolve().parents[1]
CLASSES = 6
PER_CLASS = 8


def make_image(cls: int, seed: int, size: int = 64) -> Image.Image:
    """Class = hue + stripe period; per-image noise."""
    rng = np.random.default_rng(seed)
    hue = np.array([(cls * 53) % 256, (cls * 97 + 80) % 256, (cls * 151 + 160) % 256], dtype=np.float32)
    img = np.tile(hue, (size, size, 1))
    stripes = (np.arange(size) // (4 + 3 * cls)) % 2
    img[stripes == 1] *= 0.5
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


class Role:
    """One compose service as a subprocess of `retrieval`, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Role:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", *self.args], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        return self

    def run(self, timeout: float) -> str:
        """A one-shot role (migrate, indexer): must exit 0."""
        self.start()
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, f"{self.name} exited {rc}:\n{self.tail()}"
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, as `docker compose stop` sends; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


def wait_until(what: str, check, timeout: float, roles: list[Role], interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for role in roles:
            assert role.alive(), f"{role.name} died while waiting for {what}:\n{role.tail()}"
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(interval)
    logs = "\n".join(f"--- {r.name}\n{r.tail(2500)}" for r in roles)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{logs}")


def compose_commands(port: int, corpus: Path) -> dict[str, list[str]]:
    """Each app service's `command` from docker-compose.yml, with ${VAR:-default} at its default, loopback instead
    of 0.0.0.0, the test's port instead of 8000 and the corpus folder instead of the /corpus mount."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    swap = {"0.0.0.0": "127.0.0.1", "8000": str(port), "/corpus": str(corpus)}
    commands = {}
    for name in ("migrate", "api", "worker", "indexer"):
        args = [re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(a)) for a in services[name]["command"]]
        commands[name] = [swap.get(a, a) for a in args]
    return commands


def docs_key_command() -> str:
    """The Python code docs/deployment.md runs (`--entrypoint python migrate -c "..."`) to create an API key."""
    text = (REPO / "docs" / "deployment.md").read_text()
    m = re.search(r'--entrypoint python migrate -c "(.*?)"', text, re.DOTALL)
    assert m, "docs/deployment.md shows how to create an API key"
    return m.group(1).replace("\\\n", "")


def dockerfile_healthcheck() -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.MULTILINE)
    assert m, "the Dockerfile has an exec-form HEALTHCHECK"
    return json.loads(m.group(1))


@pytest.fixture
def tiny_embedder(tmp_path: Path) -> Path:
    from models.checkpoint import save_checkpoint
    from models.embedder import EmbedderConfig
    from models.zoo import create_embedder

    config = EmbedderConfig(arch="timm", backbone="resnet10t", dim=64, image_size=64, resize_size=64,
                            pretrained="none")
    return save_checkpoint(create_embedder(config).eval(), tmp_path / "tiny-embedder")


@pytest.mark.slow
def test_compose_topology_as_processes(postgres_server, tiny_embedder: Path, tmp_path: Path) -> None:
    database_url = postgres_server.create_database()
    corpus = tmp_path / "corpus"
    for cls in range(CLASSES):
        (corpus / f"class{cls}").mkdir(parents=True)
        for n in range(PER_CLASS):
            make_image(cls, seed=cls * 1000 + n).save(corpus / f"class{cls}" / f"{n}.jpg", quality=92)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    # The x-app environment of docker-compose.yml, with loopback, a temp data dir and quick polling.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    env.update({
        "RETRIEVAL_DATABASE_URL": database_url,
        "RETRIEVAL_DATA_DIR": str(tmp_path / "data"),
        "RETRIEVAL_DEVICE": "cpu",
        "RETRIEVAL_EMBEDDER": str(tiny_embedder),
        "RETRIEVAL_AUTH_ENABLED": "true",  # the compose default: writes need a key, reads are open
        "RETRIEVAL_OPEN_READS": "true",
        "RETRIEVAL_BATCH_SIZE": "16",
        "RETRIEVAL_NUM_WORKERS": "0",
        "RETRIEVAL_PORT": str(port),
        "RETRIEVAL_SWAP_POLL_S": "0.5",
        "RETRIEVAL_WORKER_POLL_S": "0.5",
        "RETRIEVAL_WORKER_HEARTBEAT_S": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # three torch processes on two cores
    })

    # migrate: one-shot, before anything else.
    commands = compose_commands(port, corpus)
    out = Role("migrate", commands["migrate"], env, logs).run(timeout=60)
    assert "database at revision" in out

    # An API key, created the way docs/deployment.md says (a one-off container of the app image).
    made = subprocess.run([sys.executable, "-c", docs_key_command()], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = {"X-API-Key": made.stdout.strip().splitlines()[-1]}

    api = Role("api", commands["api"], env, logs).start()
    worker = Role("worker", commands["worker"], env, logs).start()
    running = [api, worker]
    try:
        # Live before any index exists; not ready (no active index) until the batch job publishes one.
        wait_until("api /healthz", lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 90, running)
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503

        # The Dockerfile's own HEALTHCHECK command passes against it (RETRIEVAL_PORT is in env).
        health = subprocess.run([sys.executable if c == "python" else c for c in dockerfile_healthcheck()],
                                env=env, capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr

        # indexer (profile batch): build while api and worker run; the api hot-swaps to it.
        Role("indexer", commands["indexer"], env, logs).run(timeout=120)
        ready = wait_until("api ready on the built index",
                           lambda: (r := httpx.get(f"{base}/readyz", timeout=5)).status_code == 200 and r.json(),
                           60, running)
        first_model = ready["detail"]["model_version"]
        assert ready["detail"]["vectors"] == CLASSES * PER_CLASS

        # A query through HTTP: a corpus image finds itself first.
        query = jpeg(make_image(2, seed=2 * 1000 + 3))
        response = httpx.post(f"{base}/v1/search", files={"file": ("q.jpg", query, "image/jpeg")},
                              data={"k": "5"}, timeout=60)
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert len(hits) == 5
        assert hits[0]["label"] == "class2" and hits[0]["score"] > 0.99

        # A training job through HTTP, run by the worker, promoted, and picked up by the api without a restart.
        params = {"steps": 4, "batch_size": 16, "m_per_class": 4, "num_workers": 0, "amp": False,
                  "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 2, "log_every": 1, "eval_batch_size": 32,
                  "force_promote": True, "torch_threads": 1}
        job_request = {"kind": "train", "params": params}
        assert httpx.post(f"{base}/v1/jobs", json=job_request, timeout=30).status_code == 401
        created = httpx.post(f"{base}/v1/jobs", json=job_request, headers=key, timeout=30)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        def finished():
            job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_until(f"job {job_id}", finished, 150, running, interval=0.5)
        assert job["status"] == "succeeded", json.dumps(job, indent=1) + "\n" + worker.tail()
        assert job["progress"] == pytest.approx(1.0)
        assert job["metrics"]["promoted"] is True
        new_model = job["metrics"]["model_version"]
        assert new_model != first_model

        swapped = wait_until("api hot-swap to the promoted model",
                             lambda: (r := httpx.get(f"{base}/readyz", timeout=5).json())["detail"].get(
                                 "model_version") == new_model and r, 60, running)
        assert swapped["detail"]["vectors"] == CLASSES * PER_CLASS
        response = httpx.post(f"{base}/v1/search", files={"file": ("q.jpg", query, "image/jpeg")},
                              data={"k": "3"}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == new_model
        assert response.json()["results"][0]["label"] == "class2"
    finally:
        codes = {role.name: role.stop() for role in running}
    # `docker compose stop` sends SIGTERM: both roles shut down cleanly within their grace period. The worker exits
    # 0; uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM after "Application shutdown complete".
    assert codes["worker"] == 0, f"worker exited {codes['worker']} on SIGTERM:\n{worker.tail()}"
    assert codes["api"] in (0, -signal.SIGTERM), f"api exited {codes['api']} on SIGTERM:\n{api.tail()}"
    assert "Application shutdown complete" in api.tail()
