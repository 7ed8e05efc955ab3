"""The SQL job queue on SQLite and PostgreSQL: claims are exclusive under concurrency, stale jobs are re-queued
or failed, cancel and ownership checks."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import jobs
from app.db.models import Job
from app.db.session import get_engine, session_scope
from tests.conftest import REPO


def _enqueue(url: str, n: int, kind: str = "rebuild_index", max_attempts: int = 3) -> list[int]:
    with session_scope(url) as session:
        return [jobs.enqueue(session, kind, {"factory": f"Flat{i}"}, max_attempts=max_attempts).id for i in range(n)]


def _age_heartbeat(url: str, job_id: int, seconds: float) -> None:
    with get_engine(url).begin() as conn:
        old = jobs.utcnow() - timedelta(seconds=seconds)
        conn.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))


def test_claims_are_exclusive_across_threads(database_url: str) -> None:
    ids = _enqueue(database_url, 30)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def claimer(name: str) -> None:
        start.wait()
        while (job := jobs.claim(database_url, name)) is not None:
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(job_id for _, job_id in claimed)
    assert sorted(counts) == ids and set(counts.values()) == {1}, counts
    with session_scope(database_url) as session:
        rows = {j.id: j for j in jobs.list_jobs(session, limit=100)}
    for name, job_id in claimed:
        assert rows[job_id].status == "running" and rows[job_id].worker_id == name and rows[job_id].attempts == 1


CLAIM_SCRIPT = """
import sys
from app import jobs
url, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
got = []
while (job := jobs.claim(url, name)) is not None:
    got.append(job.id)
open(out, "w").write(" ".join(map(str, got)))
"""


def test_claims_are_exclusive_across_processes(database_url: str, tmp_path) -> None:
    ids = _enqueue(database_url, 40)
    outs = [tmp_path / f"claimed{i}.txt" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_SCRIPT, database_url, f"p{i}", str(out)], cwd=REPO)
             for i, out in enumerate(outs)]
    for p in procs:
        assert p.wait(120) == 0
    claimed = [int(x) for out in outs for x in out.read_text().split()]
    assert sorted(claimed) == ids  # every job exactly once


def test_oldest_first_and_empty_queue(database_url: str) -> None:
    assert jobs.claim(database_url, "w") is None
    first, second = _enqueue(database_url, 2)
    assert jobs.claim(database_url, "w").id == first
    assert jobs.claim(database_url, "w").id == second
    assert jobs.claim(database_url, "w") is None


def test_heartbeat_progress_and_ownership(database_url: str) -> None:
    (job_id,) = _enqueue(database_url, 1)
    jobs.claim(database_url, "a")
    beat = jobs.heartbeat(database_url, job_id, "a", progress=0.25, message="step 5/20", metrics={"loss": 1.5})
    assert beat.owned and not beat.cancel_requested
    assert not jobs.heartbeat(database_url, job_id, "b").owned  # another worker cannot touch it
    assert not jobs.finish(database_url, job_id, "b", "succeeded")
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert (job.progress, job.message, job.metrics) == (0.25, "step 5/20", {"loss": 1.5})
    assert jobs.finish(database_url, job_id, "a", "succeeded", metrics={"recall@1": 0.9})
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job.status == "succeeded" and job.progress == 1.0 and job.finished_at is not None


def test_stale_job_is_requeued_then_failed_after_max_attempts(database_url: str) -> None:
    (job_id,) = _enqueue(database_url, 1, max_attempts=2)
    assert jobs.claim(database_url, "dead1").id == job_id
    assert jobs.requeue_stale(database_url, 30).requeued == []  # fresh heartbeat: left alone
    _age_heartbeat(database_url, job_id, 60)
    report = jobs.requeue_stale(database_url, 30)
    assert report.requeued == [job_id]
    # The presumed-dead worker has lost the job: its heartbeat and finish are refused.
    assert not jobs.heartbeat(database_url, job_id, "dead1").owned
    assert not jobs.finish(database_url, job_id, "dead1", "succeeded")
    job = jobs.claim(database_url, "dead2")
    assert job.id == job_id and job.attempts == 2
    _age_heartbeat(database_url, job_id, 60)
    report = jobs.requeue_stale(database_url, 30)
    assert report.failed == [job_id] and report.requeued == []
    with session_scope(database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job.status == "failed" and "dead2 stopped heartbeating" in job.error and job.finished_at


def test_cancel_queued_and_running(database_url: str) -> None:
    queued, running = _enqueue(database_url, 2)
    assert jobs.claim(database_url, "w").id == queued  # oldest first; cancel the other while queued
    with session_scope(database_url) as session:
        assert jobs.request_cancel(session, running).status == "cancelled"
        job = jobs.request_cancel(session, queued)
        assert job.status == "running" and job.cancel_requested
    assert jobs.claim(database_url, "w2") is None  # a cancelled job is never claimed
    assert jobs.heartbeat(database_url, queued, "w").cancel_requested
    assert jobs.finish(database_url, queued, "w", "cancelled", message="stopped")


def test_release_returns_job_to_queue(database_url: str) -> None:
    (job_id,) = _enqueue(database_url, 1)
    jobs.claim(database_url, "w")
    assert jobs.release(database_url, job_id, "w", "worker shutting down")
    job = jobs.claim(database_url, "w2")
    assert job.id == job_id and job.attempts == 1


def test_enqueue_rejects_unknown_kind_and_params(database_url: str) -> None:
    with session_scope(database_url) as session:
        with pytest.raises(jobs.JobError, match="unknown job kind"):
            jobs.enqueue(session, "mine_bitcoin")
        with pytest.raises(jobs.JobError, match=r"unknown train params \['step'\]"):
            jobs.enqueue(session, "train", {"step": 10})
        assert jobs.enqueue(session, "train", {"steps": 10, "loss": {"name": "triplet"}, "force_promote": True}).id



def test_a_factory_faiss_cannot_make_is_refused_when_the_job_is_submitted(database_url: str, tmp_path) -> None:
    """Not a job that fails minutes later in the worker: the type is checked against the model it indexes."""
    from app.registry import register_model

    with session_scope(database_url) as session:  # no model yet: nothing to check against, the job says so
        assert jobs.enqueue(session, "rebuild_index", {"factory": "IVF16,PQ7"}).status == "queued"
        register_model(session, tmp_path, "m32", "timm", 32, status="active")
        register_model(session, tmp_path, "m30", "timm", 30, status="candidate")
    with session_scope(database_url) as session:
        with pytest.raises(jobs.JobError, match="could not parse index string Bogus"):
            jobs.enqueue(session, "rebuild_index", {"factory": "Bogus"})
        assert jobs.enqueue(session, "rebuild_index", {"factory": "IVF16,PQ8"}).status == "queued"  # 32 = 8 x 4
        with pytest.raises(jobs.JobError, match="multiple of the number of subquantizers"):
            jobs.enqueue(session, "reembed", {"model_version": "m30", "factory": "IVF16,PQ8"})
        with pytest.raises(jobs.JobError, match="factory is a FAISS index factory string"):
            jobs.enqueue(session, "reembed", {"factory": 8})
