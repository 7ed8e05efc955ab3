"""The training worker end to end, with real SQL and real training.

Where the worker process is the point it is a real subprocess: SIGKILL mid-job (then another worker resumes it),
two workers competing for jobs, SIGTERM handing a job back. Elsewhere the worker loop runs in this process
(run_worker, what `retrieval worker` calls), and so does the app serving queries while a job promotes a model.

A tiny random-init resnet10t (64 px, 64-d) is the active model; a corpus of 4 generated classes is indexed with it.
Jobs train a few steps on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from app import jobs
from app.db.models import Job
from app.db.session import session_scope
from app.registry import active_index, active_model
from app.settings import Settings
from app.worker import run_worker
from models.export import ONNX_FILE, export_dir
from tests.conftest import REPO, CliResult, class_image, jpeg_bytes, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, server_env, upload

# Fast heartbeats and a short stale window, so a killed worker is noticed in seconds.
WORKER_SETTINGS = {"worker_heartbeat_s": 0.5, "worker_stale_after_s": 4, "worker_poll_s": 0.3}
WORKER_ENV = {f"RETRIEVAL_{k.upper()}": str(v) for k, v in WORKER_SETTINGS.items()} | {"OMP_NUM_THREADS": "1"}
# A few CPU steps: 2 train classes x 4 images per batch; warm-up off so the steps actually move the weights.
TRAIN = {"steps": 4, "batch_size": 8, "m_per_class": 4, "num_workers": 0, "val_fraction": 0.5, "warmup_steps": 0,
         "log_every": 1, "checkpoint_every": 1, "eval_every": 2, "lr": 1e-4, "torch_threads": 1}


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Settings:
    """Settings (SQLite, PostgreSQL) whose active model + index are the tiny embedder over 4 classes x 8 images."""
    return build_served_corpus(tmp_path, database_url, per_class=8, **WORKER_SETTINGS)


@pytest.fixture
def sqlite_world(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The same world on SQLite only, for what the worker process does whatever the database."""
    return build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=8, **WORKER_SETTINGS)


def worker_in_process(settings: Settings, worker_id: str, timeout: float, **kwargs: object) -> int:
    """run_worker() here, as `retrieval worker` runs it; told to shut down after `timeout` (the job it is on is
    then handed back, which fails the test's checks instead of hanging it)."""
    shutdown = threading.Event()
    timer = threading.Timer(timeout, shutdown.set)
    timer.start()
    try:
        return run_worker(settings, worker_id=worker_id, shutdown=shutdown, **kwargs)
    finally:
        timer.cancel()


def start_worker(settings: Settings, log: Path, *args: str) -> subprocess.Popen:
    env = server_env(settings) | WORKER_ENV
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", *args], cwd=REPO, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def enqueue(settings: Settings, kind: str, params: dict, max_attempts: int = 3) -> int:
    with session_scope(settings.resolved_database_url) as session:
        return jobs.enqueue(session, kind, params, max_attempts).id


def job_row(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        session.expunge(job)
        return job


def wait_job(settings: Settings, job_id: int, until: Callable[[Job], bool], timeout: float,
             log: Path | None = None, poll: float = 0.2) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_row(settings, job_id)
        if until(job):
            return job
        time.sleep(poll)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"job {job_id} stuck: {job.status} {job.progress} {job.message} {job.error}\n{tail}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_job_via_api_promotes_and_serving_never_fails(world: Settings, capsys: pytest.CaptureFixture[str],
                                                       run_cli: Callable[..., CliResult]) -> None:
    settings = world
    with session_scope(settings.resolved_database_url) as session:
        old_model, old_index = active_model(session).name, active_index(session).name
    failures: list[str] = []
    answered: list[str] = []
    stop_queries = threading.Event()
    query = jpeg_bytes(class_image("red", seed=4242, size=64))

    with app_client(settings) as client:

        def fire() -> None:  # queries all through the job: every one must succeed
            while not stop_queries.is_set():
                try:
                    r = upload(client, query, k=3)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        answered.append(r.json()["model_version"])
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                time.sleep(0.05)

        shooter = threading.Thread(target=fire, daemon=True)
        shooter.start()
        worker = None
        try:
            r = client.post("/v1/jobs", json={"kind": "train", "params": {"step": 3}})
            assert r.status_code == 422 and "unknown train params" in r.json()["message"]
            r = client.post("/v1/jobs", json={"kind": "train", "params": {**TRAIN, "force_promote": True}})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            assert r.json()["status"] == "queued"
            # The worker loop beside the app, as a separate `retrieval worker` would run it: one job, then stop.
            worker = threading.Thread(target=worker_in_process, args=(settings, "api-test", 240),
                                      kwargs={"max_jobs": 1}, daemon=True)
            worker.start()
            seen_running = False
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                body = client.get(f"/v1/jobs/{job_id}").json()
                seen_running |= body["status"] == "running" and body["progress"] > 0
                if body["status"] in jobs.FINISHED:
                    break
                time.sleep(0.3)
            assert body["status"] == "succeeded", (body, capsys.readouterr().out[-3000:])
            assert seen_running and body["progress"] == 1.0 and body["attempts"] == 1
            metrics = body["metrics"]
            assert metrics["promoted"] and metrics["model_version"] == f"model-job{job_id}"
            assert {"recall@1", "map@r"} <= set(metrics["candidate"])
            assert {"recall@1", "map@r"} <= set(metrics["baseline"])
            new_model = metrics["model_version"]
            with session_scope(settings.resolved_database_url) as session:
                model, index = active_model(session), active_index(session)
                assert (model.name, index.name) == (new_model, metrics["index_version"]) != (old_model, old_index)
                assert index.model_version_id == model.id and "recall@1" in model.metrics
            # The service hot-swaps: search answers with the new model.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not answered or answered[-1] != new_model):
                time.sleep(0.2)
            assert answered and answered[-1] == new_model
            # The promoted model was exported when the job built its index and is served by the fast runtime.
            ready = client.get("/readyz").json()["detail"]
            assert ready["model_version"] == new_model and ready["runtime"] == "openvino", ready
            with session_scope(settings.resolved_database_url) as session:
                promoted_path = active_model(session).path
            assert (export_dir(promoted_path) / ONNX_FILE).is_file()
            logs = client.get(f"/v1/jobs/{job_id}/logs").json()["lines"]
            assert any("promoted" in line for line in logs) and any("train step" in line for line in logs)
            listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
            assert [j["id"] for j in listed] == [job_id]
        finally:
            stop_queries.set()
            shooter.join(30)
            if worker is not None:
                worker.join(60)
    assert "promoted" in capsys.readouterr().out  # progress on the worker's stdout
    assert not failures, failures[:5]
    assert old_model in answered and new_model in answered  # queries were answered before and after the swap
    # The CLI lists and follows jobs.
    out = run_cli(settings, "jobs", "list")
    assert out.returncode == 0 and f"{job_id} train" in " ".join(out.stdout.split()), out.stderr
    out = run_cli(settings, "jobs", "follow", str(job_id))
    assert out.returncode == 0 and "succeeded" in out.stdout


def test_sigkilled_worker_job_is_requeued_and_resumes_from_checkpoint(world: Settings, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    settings = world
    job_id = enqueue(settings, "train", {**TRAIN, "steps": 10, "eval_every": 5, "force_promote": True})
    log = tmp_path / "worker1.log"
    first = start_worker(settings, log, "--id", "doomed")
    resume = jobs.job_dir(settings, job_id) / "train" / "resume.pt"
    try:
        wait_job(settings, job_id, lambda j: resume.exists() and j.progress >= 0.22, 180, log=log)
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind
        first.wait(30)
    assert job_row(settings, job_id).status == "running"  # the row still says running: the worker is just gone
    # The kill can land between a step's progress record and its resume state, so read what was saved.
    checkpointed = torch.load(resume, map_location="cpu", weights_only=False)["step"]
    assert 2 <= checkpointed < 10
    # The rescuer need not be a process of its own: it only has to find the stale row and take the job over.
    capsys.readouterr()
    assert worker_in_process(settings, "rescuer", 240, max_jobs=1) == 1
    rescuer_out = capsys.readouterr().out
    job = job_row(settings, job_id)
    assert job.status == "succeeded", (job.error, rescuer_out[-3000:])
    assert job.attempts == 2 and job.worker_id == "rescuer" and job.metrics["promoted"]
    assert "re-queued" in rescuer_out
    # The second run resumed: its first training step is the one after the first run's last resume state.
    lines = jobs.read_log(settings, job_id, 1000)
    second_run = lines[max(i for i, line in enumerate(lines) if "claimed by rescuer" in line):]
    steps = [int(line.split("train step ")[1].split("/")[0]) for line in second_run if "train step " in line]
    assert steps and steps[0] == checkpointed + 1 and steps[-1] == 10, (checkpointed, second_run)
    records = [json.loads(x) for x in (resume.parent / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 10


def test_two_workers_never_run_the_same_job(world: Settings, tmp_path: Path) -> None:
    settings = world
    ids = [enqueue(settings, "rebuild_index", {"factory": "Flat"}) for _ in range(6)]
    workers = [start_worker(settings, tmp_path / f"w{i}.log", "--once", "--id", f"w{i}") for i in range(2)]
    for proc in workers:
        assert proc.wait(180) == 0
    owners = {}
    for job_id in ids:
        job = job_row(settings, job_id)
        assert job.status == "succeeded" and job.attempts == 1, (job.status, job.error)
        claims = [line for line in jobs.read_log(settings, job_id) if "claimed by" in line]
        assert len(claims) == 1, claims  # run once, by one worker
        owners[job_id] = job.worker_id
    assert set(owners.values()) <= {"w0", "w1"}


def test_worse_candidate_is_not_promoted(world: Settings) -> None:
    settings = world
    with session_scope(settings.resolved_database_url) as session:
        before = (active_model(session).name, active_index(session).name)
    # A learning rate far too high wrecks the tiny model within a few steps.
    job_id = enqueue(settings, "train", {**TRAIN, "lr": 5.0, "head_lr": 5.0, "grad_clip": 1000.0, "eval_every": 100})
    assert worker_in_process(settings, "judge", 240, once=True) == 1
    job = job_row(settings, job_id)
    assert job.status == "succeeded", job.error
    metrics = job.metrics
    assert not metrics["better"] and not metrics["promoted"], metrics
    assert metrics["candidate"]["map@r"] <= metrics["baseline"]["map@r"]
    with session_scope(settings.resolved_database_url) as session:
        assert (active_model(session).name, active_index(session).name) == before
        from app.db.models import ModelVersion

        candidate = session.query(ModelVersion).filter_by(name=metrics["model_version"]).one()
        assert candidate.status == "candidate" and candidate.metrics["baseline_model"] == before[0]


def test_cancel_a_running_job(world: Settings) -> None:
    settings = world
    job_id = enqueue(settings, "train", {**TRAIN, "steps": 200})
    problems: list[BaseException] = []

    def cancel_once_running() -> None:  # what POST /v1/jobs/{id}/cancel does, from another connection
        try:
            wait_job(settings, job_id, lambda j: j.progress > 0.02, 180)
            with session_scope(settings.resolved_database_url) as session:
                jobs.request_cancel(session, job_id)
        except BaseException as exc:  # reported below; the job then runs to its end and the checks fail
            problems.append(exc)

    canceller = threading.Thread(target=cancel_once_running, daemon=True)
    canceller.start()
    assert worker_in_process(settings, "w", 240, once=True) == 1
    canceller.join(30)
    assert not problems, problems
    job = job_row(settings, job_id)
    assert job.status == "cancelled" and job.progress < 0.5
    assert os.path.exists(jobs.job_dir(settings, job_id) / "train" / "resume.pt")


def test_failed_job_records_the_reason(world: Settings, tmp_path: Path) -> None:
    """A checkpoint there when the job was queued and gone when it ran: the job fails saying what could be named."""
    import shutil

    from tests.test_api_helpers import save_tiny_embedder

    checkpoint = save_tiny_embedder(tmp_path / "moved-away")
    job_id = enqueue(world, "reembed", {"model_version": str(checkpoint)})
    shutil.rmtree(checkpoint)
    assert run_worker(world, worker_id="inproc", once=True) == 1
    job = job_row(world, job_id)
    assert job.status == "failed" and "moved-away' does not exist" in job.message and "ValueError" in job.error
    assert "efficientnet_lite0" in job.message  # the presets it could have named


def test_reembed_moves_the_corpus_to_another_embedder(world: Settings, tmp_path: Path) -> None:
    """How a corpus changes embedder: a reembed job naming a checkpoint (or a preset) not registered yet registers
    it, embeds every image with it and promotes the pair; a name that is none of those is refused when queued."""
    from tests.test_api_helpers import save_tiny_embedder

    with pytest.raises(jobs.JobError) as refused:
        enqueue(world, "reembed", {"model_version": "no-such-model"})
    with session_scope(world.resolved_database_url) as session:
        before = active_model(session).name
    assert str(refused.value) == (f"model version 'no-such-model' does not exist: name a registered version "
                                  f"({before}), a preset (efficientnet_lite0, efficientnet_lite0_gem, "
                                  "efficientnet_lite01_gem, efficientnet_lite012_gem) or a checkpoint directory")
    other = save_tiny_embedder(tmp_path / "wider-embedder", dim=32, seed=1)
    job_id = enqueue(world, "reembed", {"model_version": str(other)})
    assert worker_in_process(world, "w", 120, once=True) == 1
    job = job_row(world, job_id)
    assert job.status == "succeeded", job.error
    with session_scope(world.resolved_database_url) as session:
        model, index = active_model(session), active_index(session)
        assert (model.name, model.dim, index.ntotal) == ("wider-embedder", 32, 32)
    with app_client(world) as client:
        found = upload(client, jpeg_bytes(class_image("red", seed=5)), k=3)
        assert found.status_code == 200 and found.json()["model_version"] == "wider-embedder"

    # Another run's checkpoint under the same folder name would silently be the first one: refused, saying so.
    namesake = save_tiny_embedder(tmp_path / "run2" / "wider-embedder", dim=32, seed=2)
    with pytest.raises(jobs.JobError) as taken:
        enqueue(world, "reembed", {"model_version": str(namesake)})
    assert str(taken.value).startswith(f"a model version named 'wider-embedder' is already registered from {other}")
    assert enqueue(world, "reembed", {"model_version": str(other)})  # the same directory again: a re-run, fine


def test_rerun_after_a_crash_past_promotion_does_not_redo_it(world: Settings) -> None:
    """A run that promoted and then died: the re-run finds the candidate active and records success."""
    from sqlalchemy import update

    from app.db.session import get_engine

    job_id = enqueue(world, "train", {**TRAIN, "steps": 2, "force_promote": True})
    assert run_worker(world, worker_id="first", once=True) == 1
    done = job_row(world, job_id)
    assert done.status == "succeeded" and done.metrics["promoted"]
    with get_engine(world.resolved_database_url).begin() as conn:  # as if the worker died before finish()
        conn.execute(update(Job).where(Job.id == job_id).values(status="queued", worker_id=None))
    assert run_worker(world, worker_id="second", once=True) == 1
    again = job_row(world, job_id)
    assert again.status == "succeeded" and again.metrics["promoted"]
    assert again.metrics["index_version"] == done.metrics["index_version"]  # nothing rebuilt
    assert again.metrics["baseline_model"] == done.metrics["baseline_model"] != again.metrics["model_version"]
    with session_scope(world.resolved_database_url) as session:
        assert active_model(session).name == done.metrics["model_version"]


def test_sigterm_hands_the_running_job_back(sqlite_world: Settings, tmp_path: Path) -> None:
    """The worker process's signal handling; handing back is SQL that tests/test_jobs.py runs on both databases."""
    settings = sqlite_world
    job_id = enqueue(settings, "train", {**TRAIN, "steps": 200})
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log)
    try:
        wait_job(settings, job_id, lambda j: j.progress > 0.02, 180, log=log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()[-3000:]
    finally:
        stop(worker)
    job = job_row(settings, job_id)
    # Back in the queue, the run not counted: the next worker resumes it from its checkpoint.
    assert job.status == "queued" and job.attempts == 0 and job.worker_id is None, (job.status, job.message)
    assert "shut down" in job.message


def _assert_one_consistent_pair(settings: Settings, images: int = 32) -> str:
    """The active index was built with the active model, its files load, and SQL agrees with it."""
    from app.indexing import verify_index
    from index.vector_index import VectorIndex

    with session_scope(settings.resolved_database_url) as session:
        index_row, model_row = active_index(session), active_model(session)
        assert index_row.model_version_id == model_row.id, (index_row.name, model_row.name)
        path, name = index_row.path, model_row.name
    assert len(VectorIndex.load(path)) == images
    assert verify_index(settings).ok
    return name


def test_worker_sigkilled_during_reembed_and_promotion_never_half_promotes(request: pytest.FixtureRequest,
                                                                          tmp_path: Path) -> None:
    """SIGKILL while the promoted job re-embeds the corpus, then again as it builds and promotes the index: the
    active pair is always one whole pair (old or new), and the job resumes and finishes."""
    # 4 classes x 24 images embedded 2 at a time, each pair its own fsynced shard: long enough a stage that the
    # first kill lands in it on a quiet machine too (with 4 x 8 images a worker could finish between two polls).
    world = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=24,
                                **WORKER_SETTINGS)
    settings = world.model_copy(update={"batch_size": 2, "embed_flush_every": 2})
    before = _assert_one_consistent_pair(settings, 96)
    job_id = enqueue(settings, "train", {**TRAIN, "steps": 2, "force_promote": True})
    # The first kill: as soon as the job is past training (re-embedding, or already building); the second: once
    # it builds the index (or has finished, when the resumed run was quicker than a poll).
    for n, stages in enumerate((("embedding the corpus", "building the index"), ("building the index",))):
        log = tmp_path / f"worker{n}.log"
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=REPO,
                                env=server_env(settings) | WORKER_ENV | {"RETRIEVAL_EMBED_FLUSH_EVERY": "2"},
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        try:
            wait_job(settings, job_id,
                     lambda j, s=stages: any(x in (j.message or "") for x in s) or j.status == "succeeded",
                     240, log=log, poll=0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        _assert_one_consistent_pair(settings, 96)  # old or new, whichever side of the SQL flip the kill landed
    if job_row(settings, job_id).status != "succeeded":
        assert worker_in_process(settings, "rescuer", 240, max_jobs=1) == 1
    job = job_row(settings, job_id)
    assert job.status == "succeeded" and job.metrics["promoted"], (job.error, job.message)
    assert job.attempts >= 2  # at least one run was killed mid-job and the job was taken over
    assert _assert_one_consistent_pair(settings, 96) == job.metrics["model_version"] != before


def test_train_job_under_torchrun_with_two_processes(sqlite_world: Settings) -> None:
    """`nproc: 2`: the worker trains with torchrun (2 gloo processes, DDP), then evaluates and promotes as usual."""
    settings = sqlite_world
    job_id = enqueue(settings, "train", {**TRAIN, "nproc": 2, "force_promote": True})
    assert worker_in_process(settings, "ddp", 300, once=True) == 1
    job = job_row(settings, job_id)
    assert job.status == "succeeded", job.error
    assert job.metrics["train_processes"] == 2 and job.metrics["train_steps"] == TRAIN["steps"]
    assert job.metrics["promoted"]
    log = (jobs.job_dir(settings, job_id) / "torchrun" / "torchrun.log").read_text()
    assert "Traceback" not in log
    with session_scope(settings.resolved_database_url) as session:
        with pytest.raises(jobs.JobError, match="nproc"):
            jobs.enqueue(session, "train", {"nproc": 0})


def test_a_job_asking_for_an_index_the_corpus_cannot_train_fails_in_one_line(sqlite_world: Settings) -> None:
    """The type parses (so the queue takes it), but 32 images cannot train 4,096 lists: the job's error is that
    sentence, as the CLI would say it, not a traceback."""
    settings = sqlite_world
    job_id = enqueue(settings, "rebuild_index", {"factory": "IVF4096,Flat"})
    worker_in_process(settings, "small", 120, once=True)
    job = job_row(settings, job_id)
    assert job.status == "failed"
    assert job.error == ("IVF4096,Flat needs at least 4096 vectors to train, and there are 32: choose a smaller "
                         "type (e.g. Flat for this corpus) or leave the type out and the build chooses one")
