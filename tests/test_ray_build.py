"""`retrieval index build --ray`: on a real local Ray cluster the build equals the single-process one, gives up
with a message after three passes that each lost their actor, resumes after SIGKILL of its driver, and runs
across a two-node cluster started with `ray start` on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from tests.conftest import REPO, make_settings, migrated_url, settings_env
from tests.postgres import free_port
from tests.test_indexing import make_corpus, plant_bad_files

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_temp() -> Iterator[Path]:
    # Short path: Ray's Unix sockets live under it and sun_path holds 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(ray_temp: Path) -> Iterator[str]:
    """A real local Ray cluster with 2 CPUs in this process; yields its GCS address for other drivers."""
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(ray_temp), log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _state(settings, url: str) -> tuple[dict[str, int], set[str], np.ndarray, np.ndarray, str]:
    """(sha256 -> id, sha256s of soft-deleted rows, stored ids, stored vectors, active index path)."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.registry import active_index, active_model
    from index import versions

    with session_scope(url) as session:
        ids = {sha: i for i, sha in session.execute(select(Image.id, Image.sha256)).tuples()}
        deleted = set(session.scalars(select(Image.sha256).where(Image.deleted_at.is_not(None))))
        path = active_index(session).path
        stored_ids, vectors = versions.load_embeddings(settings.embeddings_dir(active_model(session).name))
    return ids, deleted, stored_ids, vectors, path


def _store(settings) -> Path | None:
    """The embedding store of the build's model (the only model in these data dirs), once the build made it."""
    stores = sorted(p for p in (settings.data_dir / "embeddings").glob("*") if p.is_dir())
    return stores[0] if stores else None


def _committed_ids(settings) -> np.ndarray:
    """Ids with a committed embedding shard (ids file = commit marker), read while a build runs."""
    from index import versions

    store = _store(settings)
    return versions.embedded_ids(store) if store is not None else np.zeros(0, dtype=np.int64)


def _recall_overlap(path_a: str, path_b: str, queries: np.ndarray, k: int = 10) -> float:
    from index.vector_index import VectorIndex

    _, found_a = VectorIndex.load(path_a).search(queries, k)
    _, found_b = VectorIndex.load(path_b).search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found_a, found_b, strict=True)]))


def _assert_same_build(single: tuple, distributed: tuple) -> None:
    ids_a, deleted_a, stored_a, vectors_a, path_a = single
    ids_b, deleted_b, stored_b, vectors_b, path_b = distributed
    assert ids_a == ids_b  # the same rows under the same ids
    assert deleted_a == deleted_b and deleted_a  # the same undecodable files soft-deleted
    assert np.array_equal(stored_a, stored_b)
    np.testing.assert_allclose(vectors_a, vectors_b, atol=2e-3)  # float16 shards
    assert _recall_overlap(path_a, path_b, vectors_a) >= 0.99


def _single_build(tmp_path: Path, corpus: Path, embedder: Path, factory: str) -> tuple:
    from app.indexing import build_index

    url = f"sqlite:///{tmp_path / 'single.db'}"
    from app.db.migrate import upgrade

    upgrade(url)
    settings = make_settings(tmp_path / "single", url, embedder=str(embedder))
    build_index(settings, corpus, factory=factory, progress=False)
    return _state(settings, url)


# Flat on SQLite; IVF (filled per shard, merged on disk) on PostgreSQL: both databases, both index routes.
@pytest.mark.parametrize(("database", "factory"), [("sqlite", "Flat"), ("postgresql", "IVF4,Flat")])
def test_ray_build_equals_single_process_build(database: str, factory: str, tmp_path: Path, tiny_embedder: Path,
                                               local_ray: str, request: pytest.FixtureRequest) -> None:
    from app.indexing import build_index, verify_index

    database_url = migrated_url(database, request, tmp_path)

    corpus = make_corpus(tmp_path / "corpus", per_class=10, size=48)  # 40 images
    plant_bad_files(corpus)
    single = _single_build(tmp_path, corpus, tiny_embedder, factory)

    settings = make_settings(tmp_path / "ray", database_url, embedder=str(tiny_embedder), embed_flush_every=8)
    report = build_index(settings, corpus, factory=factory, progress=False, ray_address="")
    assert report.embedded == 40 and report.total_indexed == 40 and len(report.failed) == 2
    _assert_same_build(single, _state(settings, database_url))
    if "IVF" in factory:  # filled per embedding shard, merged with FAISS's on-disk merge
        assert (settings.indexes_dir / report.index_version_name / "merged.ivfdata").exists()
    assert verify_index(settings).ok
    again = build_index(settings, corpus, factory=factory, progress=False, ray_address="")
    assert again.added == 0 and again.embedded == 0 and "nothing to publish" in again.message


def test_sigkill_of_the_driver_then_rerun_completes(tmp_path: Path, tiny_embedder: Path, local_ray: str,
                                                    request: pytest.FixtureRequest) -> None:
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index, verify_index
    from index import versions

    url = migrated_url("postgresql", request, tmp_path)
    corpus = make_corpus(tmp_path / "corpus", per_class=30, size=48)  # 120 images
    settings = make_settings(tmp_path / "data", url, embedder=str(tiny_embedder), embed_flush_every=4)
    env = settings_env(settings) | {"RETRIEVAL_EMBED_FLUSH_EVERY": "4", "RETRIEVAL_RAY_EMBED_ACTORS": "1"}
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:  # a second driver on the same cluster, killed once it has committed shards
        driver = subprocess.Popen([sys.executable, "-m", "app.cli", "index", "build", str(corpus), "--ray",
                                   local_ray], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while driver.poll() is None and time.monotonic() < deadline:
        if len(_committed_ids(settings)) >= 8:
            os.kill(driver.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert driver.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    committed = len(_committed_ids(settings))
    store = _store(settings)
    assert 8 <= committed < 120, "the build finished before the kill: make the corpus larger"

    report = build_index(settings, corpus, progress=False, ray_address="")
    assert report.added == 0  # every row was registered before the kill; none twice
    assert report.embedded <= 120 - committed + 4 * 2  # committed shards skipped (a dying actor may add one)
    with session_scope(url) as session:
        assert session.scalar(select(func.count(Image.id))) == 120
    assert np.array_equal(versions.embedded_ids(store), np.arange(1, 121))
    assert verify_index(settings).ok


def _stat_after_comm(proc: Path) -> list[str]:
    """/proc/<pid>/stat's fields after "(comm)": state ppid pgrp session ... (comm itself may hold spaces)."""
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(_stat_after_comm(Path("/proc") / str(pid))[1])
        except (OSError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


@contextmanager
def killing_embed_actors() -> Iterator[list[int]]:
    """SIGKILL every embed actor of this process's Ray cluster as soon as it appears (an OOM killer that never
    lets one live); yields the pids killed so far."""
    import threading

    killed: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) in killed:
                    continue
                try:
                    title = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"_EmbedActor" in title and _descends_from(int(proc.name), os.getpid()):
                    with suppress(ProcessLookupError):
                        os.kill(int(proc.name), signal.SIGKILL)
                        killed.append(int(proc.name))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()


def test_a_build_whose_actors_keep_dying_gives_up_after_three_passes_and_resumes(
        tmp_path: Path, tiny_embedder: Path, local_ray: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.indexing.ray_build as ray_build
    from app.db.migrate import upgrade
    from app.indexing import RayWorkersLost, build_index, verify_index

    monkeypatch.setattr(ray_build, "RAY_NODE_LOSS_WAIT_S", 1.0)  # no node dies here: nothing to wait for
    url = f"sqlite:///{tmp_path / 'ray.db'}"
    upgrade(url)
    settings = make_settings(tmp_path / "data", url, embedder=str(tiny_embedder), embed_flush_every=4)
    corpus = make_corpus(tmp_path / "corpus", per_class=5, size=48)  # 20 images
    with killing_embed_actors() as killed, pytest.raises(RayWorkersLost) as lost:
        build_index(settings, corpus, progress=False, ray_address="")
    message = str(lost.value)
    assert f"Gave up after {ray_build.RAY_PASSES} passes" in message and "run the same command again" in message
    assert len(killed) >= ray_build.RAY_PASSES  # one pass per plan, each lost its actor
    committed = len(_committed_ids(settings))
    report = build_index(settings, corpus, progress=False, ray_address="")  # the same command, actors left alive
    assert report.added == 0 and report.embedded == 20 - committed  # committed shards are not redone
    assert np.array_equal(_committed_ids(settings), np.arange(1, 21))
    assert verify_index(settings).ok


@contextmanager
def ray_node(*args: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`ray start --block ARGS` in its own process group, ended by that group's id (never `ray stop`, which
    stops every Ray process on the machine). Yields the group leader (its pid is the group's id)."""
    with open(log, "wb") as out:
        node = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield node
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(node.pid, sig)
                node.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def _node_processes(node: subprocess.Popen) -> dict[int, tuple[int, str]]:
    """pid -> (process group, title) of every process of a `ray start` node: raylet, agents and the Ray workers
    it started. Workers run in process groups of their own, so the node is found by its session instead."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            _, _, pgrp, session = _stat_after_comm(proc)[:4]
            if proc.name.isdigit() and int(session) == node.pid:
                found[int(proc.name)] = (int(pgrp), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return found


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL all of a node's processes at once, as if its machine were lost."""
    for group in {group for group, _ in _node_processes(node).values()}:
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    node.wait(timeout=30)


def test_two_node_cluster_on_loopback(tmp_path: Path, tiny_embedder: Path, ray_temp: Path) -> None:
    """`ray start --head` plus a second `ray start --address` (two raylets, one per "node"), then
    `retrieval index build --ray ADDRESS` from a third process. Once the build has committed a shard and the
    second node runs an embed actor, that node is SIGKILLed (raylet, agents and Ray workers). The build then
    finishes on the head or stops with a message saying to run it again, within a bounded time; the same command
    run again completes on the head alone, registers nothing twice, and the result equals one machine's."""
    from app.db.migrate import upgrade
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import verify_index

    corpus = make_corpus(tmp_path / "corpus", per_class=15, size=48)  # 60 images
    plant_bad_files(corpus)
    single = _single_build(tmp_path, corpus, tiny_embedder, "Flat")

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    upgrade(url)
    settings = make_settings(tmp_path / "ray", url, embedder=str(tiny_embedder), embed_flush_every=4)
    # Ray's token auth, with a token of this test's own (not ~/.ray/auth_token) given to every process; the GCS
    # health check every second, 3 misses: the dead node is noticed in ~3 s instead of Ray's default ~16 s.
    ray_env = {"RAY_TMPDIR": str(ray_temp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    env = dict(os.environ) | ray_env
    port = free_port()
    head = f"127.0.0.1:{port}"
    common = ("--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats")
    build = ["timeout", "240", sys.executable, "-m", "app.cli", "index", "build", str(corpus), "--ray", head,
             "--factory", "Flat"]
    build_env = settings_env(settings) | ray_env | {"RETRIEVAL_RAY_EMBED_ACTORS": "2",
                                                    "RETRIEVAL_EMBED_FLUSH_EVERY": "4"}
    log = tmp_path / "first.log"
    with ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={ray_temp / 'cluster'}",
                  *common, env=env, log=tmp_path / "head.log"), \
            ray_node(f"--address={head}", *common, env=env, log=tmp_path / "node2.log") as node2:
        with open(log, "wb") as out:
            first = subprocess.Popen(build, cwd=REPO, env=build_env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while first.poll() is None and time.monotonic() < deadline:
            actor_on_node2 = any("_EmbedActor" in title for _, title in _node_processes(node2).values())
            if actor_on_node2 and len(_committed_ids(settings)) >= 4:
                _kill_node(node2)
                break
            time.sleep(0.05)
        killed_at = time.monotonic()
        assert node2.poll() is not None, "the build ended before node 2 ran an embed actor past the first commit"
        first.wait(timeout=300)  # `timeout 240` inside: a hang fails here instead of stalling CI
        output = log.read_text(errors="replace")
        replanned = [line for line in output.splitlines() if "lost a worker mid-build" in line]
        print(f"first run: exit {first.returncode} {time.monotonic() - killed_at:.1f}s after the node kill", *replanned)
        # Ray Data logs the failed pass's actor error with its traceback; after our "lost a worker" line (the new
        # pass) nothing may end in one: the command itself never dies of an uncaught exception.
        after_last_plan = output.rsplit("lost a worker mid-build", 1)[-1]
        assert "Traceback" not in after_last_plan, output[-4000:]
        if first.returncode == 0:  # Ray Data dropped the lost actor, or a new pass ran on the head
            assert "published index" in output, output[-3000:]
        else:  # or a message that says what to do, not a traceback
            assert first.returncode == 1 and "run the same command again" in output, output[-4000:]
        missing = 60 - len(_committed_ids(settings))

        again = subprocess.run(build, cwd=REPO, env=build_env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        assert "added 0 new images," in again.stdout  # nothing registered twice
        embedded = int(again.stdout.split(" failed, embedded ")[1].split()[0])
        assert embedded <= missing  # committed shards skipped
        print(f"rerun: {missing} images without a committed shard before it, {embedded} embedded by it")
    with session_scope(url) as session:  # 60 images + the truncated JPEG (soft-deleted); the text file has no row
        assert session.scalar(select(func.count(Image.id))) == 61
    _assert_same_build(single, _state(settings, url))
    assert verify_index(settings).ok


def test_ray_and_shard_do_not_combine(tmp_path: Path, tiny_embedder: Path, run_cli) -> None:
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'r.db'}", embedder=str(tiny_embedder))
    corpus = make_corpus(tmp_path / "corpus", per_class=1, size=32)
    result = run_cli(settings, "index", "build", str(corpus), "--ray", "--shard", "0/2")
    assert result.returncode == 2 and "--ray and --shard do not combine" in result.stderr
    assert not (tmp_path / "r.db").exists()  # refused before anything is touched
