"""`retrieval index build --ray`: on a real local Ray cluster the build equals the single-process one, resumes after
SIGKILL of its driver, and runs across a two-node cluster started with `ray start` on loopback."""

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
from contextlib import contextmanager
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
    from app.registry import active_model
    from index import versions

    url = migrated_url("postgresql", request, tmp_path)
    corpus = make_corpus(tmp_path / "corpus", per_class=30, size=48)  # 120 images
    settings = make_settings(tmp_path / "data", url, embedder=str(tiny_embedder), embed_flush_every=4)
    env = settings_env(settings) | {"RETRIEVAL_EMBED_FLUSH_EVERY": "4", "RETRIEVAL_RAY_EMBED_ACTORS": "1"}
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:  # a second driver on the same cluster, killed once it has committed shards
        driver = subprocess.Popen([sys.executable, "-m", "app.cli", "index", "build", str(corpus), "--ray",
                                   local_ray], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    store = None
    deadline = time.monotonic() + 180
    while driver.poll() is None and time.monotonic() < deadline:
        if store is None:
            with session_scope(url) as session:
                model = active_model(session)
                store = settings.embeddings_dir(model.name) if model is not None else None
        if store is not None and len(versions.embedded_ids(store)) >= 8:
            os.kill(driver.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert driver.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    committed = len(versions.embedded_ids(store))
    assert 8 <= committed < 120, "the build finished before the kill: make the corpus larger"

    report = build_index(settings, corpus, progress=False, ray_address="")
    assert report.added == 0  # every row was registered before the kill; none twice
    assert report.embedded <= 120 - committed + 4 * 2  # committed shards skipped (a dying actor may add one)
    with session_scope(url) as session:
        assert session.scalar(select(func.count(Image.id))) == 120
    assert np.array_equal(versions.embedded_ids(store), np.arange(1, 121))
    assert verify_index(settings).ok


@contextmanager
def ray_node(*args: str, env: dict[str, str], log: Path) -> Iterator[None]:
    """`ray start --block ARGS` in its own process group, ended by that group's id (never `ray stop`, which
    stops every Ray process on the machine)."""
    with open(log, "wb") as out:
        node = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(node.pid, sig)
                node.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def test_two_node_cluster_on_loopback(tmp_path: Path, tiny_embedder: Path, ray_temp: Path) -> None:
    """`ray start --head` plus a second `ray start --address` (two raylets, one per "node"), then
    `retrieval index build --ray ADDRESS` from a third process: the same result as one machine."""
    from app.db.migrate import upgrade
    from app.indexing import verify_index

    corpus = make_corpus(tmp_path / "corpus", per_class=10, size=48)
    plant_bad_files(corpus)
    single = _single_build(tmp_path, corpus, tiny_embedder, "Flat")

    url = f"sqlite:///{tmp_path / 'ray.db'}"
    upgrade(url)
    settings = make_settings(tmp_path / "ray", url, embedder=str(tiny_embedder), embed_flush_every=8)
    # Ray's token auth, with a token of this test's own (not ~/.ray/auth_token) given to every process.
    env = dict(os.environ, RAY_TMPDIR=str(ray_temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    port = free_port()
    head = f"127.0.0.1:{port}"
    common = ("--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats")
    with ray_node("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={ray_temp / 'cluster'}",
                  *common, env=env, log=tmp_path / "head.log"), \
            ray_node(f"--address={head}", *common, env=env, log=tmp_path / "node2.log"):
        build = subprocess.run([sys.executable, "-m", "app.cli", "index", "build", str(corpus), "--ray", head,
                                "--factory", "Flat"], cwd=REPO,
                               env=settings_env(settings) | {"RETRIEVAL_RAY_EMBED_ACTORS": "2"} | {
                                   k: env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
                               capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
        assert "on Ray (2 nodes, 2 embed actors)" in build.stdout, build.stdout[-2000:]
    _assert_same_build(single, _state(settings, url))
    assert verify_index(settings).ok


def test_ray_and_shard_do_not_combine(tmp_path: Path, tiny_embedder: Path, run_cli) -> None:
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'r.db'}", embedder=str(tiny_embedder))
    corpus = make_corpus(tmp_path / "corpus", per_class=1, size=32)
    result = run_cli(settings, "index", "build", str(corpus), "--ray", "--shard", "0/2")
    assert result.returncode == 2 and "--ray and --shard do not combine" in result.stderr
    assert not (tmp_path / "r.db").exists()  # refused before anything is touched
