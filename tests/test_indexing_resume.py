"""The hardened batch job: kill -9 and resume, shard + merge == one build, verify, compaction on rebuild.

The builds that get killed are real `retrieval index build` processes; the ones that recover, and `retrieval index
verify`, run in this process (run_cli): what they find on disk and in SQL is the point, not the process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from tests.conftest import REPO, CliResult, make_settings, settings_env
from tests.test_indexing import make_corpus

PROGRESS = re.compile(r"embed:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def run_build_until(env: dict[str, str], source: Path, stage: str, log: Path, min_done: int = 0) -> int:
    """Start `retrieval index build` and SIGKILL it once `stage` shows in its output; returns the exit code."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "index", "build", str(source)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        done = [int(m.group(1)) for m in PROGRESS.finditer(text)]
        if stage == "register" and "register:" in text or stage == "embed" and done and done[-1] >= min_done:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    return proc.wait(timeout=60)


def test_kill_9_mid_build_then_rerun_is_consistent(database_url: str, tmp_path: Path, tiny_embedder: Path,
                                                    run_cli: Callable[..., CliResult]) -> None:
    from app.db.models import Image, IndexVersion
    from app.db.session import session_scope
    from app.indexing import verify_index
    from app.registry import active_model
    from index import versions
    from index.vector_index import VectorIndex

    corpus = make_corpus(tmp_path / "corpus", per_class=40, size=48)  # 160 images
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder), batch_size=4,
                             embed_flush_every=16)
    env = settings_env(settings) | {"RETRIEVAL_EMBED_FLUSH_EVERY": "16", "RETRIEVAL_NUM_WORKERS": "1"}
    codes = [run_build_until(env, corpus, "register", tmp_path / "kill1.log"),
             run_build_until(env, corpus, "embed", tmp_path / "kill2.log", min_done=40),
             run_build_until(env, corpus, "embed", tmp_path / "kill3.log", min_done=24)]
    assert -signal.SIGKILL in codes, [p.read_text()[-2000:] for p in tmp_path.glob("kill*.log")]
    final = run_cli(settings, "index", "build", str(corpus), "--no-progress", embed_flush_every=16, num_workers=1)
    assert final.returncode == 0, final.stdout + final.stderr

    with session_scope(database_url) as session:
        assert session.scalar(select(func.count(Image.id))) == 160  # no duplicate rows
        assert session.scalar(select(func.count(Image.id)).where(Image.deleted_at.is_not(None))) == 0
        active = session.scalars(select(IndexVersion).where(IndexVersion.status == "active")).one()
        store = settings.embeddings_dir(active_model(session).name)
        live = np.array(sorted(session.scalars(select(Image.id))))
    index = VectorIndex.load(active.path)
    assert np.array_equal(np.sort(index.ids()), live)  # every image once, no missing vectors
    assert np.array_equal(versions.embedded_ids(store), live)
    assert not list(settings.indexes_dir.glob(".tmp-*"))  # no half-written version left visible
    assert verify_index(settings).ok

    again = run_cli(settings, "index", "build", str(corpus), embed_flush_every=16, num_workers=1)
    assert again.returncode == 0 and "nothing to publish" in again.stdout


def test_shards_then_merge_equal_one_build(database_url: str, tmp_path: Path, tiny_embedder: Path) -> None:
    from app.db.migrate import upgrade
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index, merge_shards

    corpus = make_corpus(tmp_path / "corpus", per_class=10, size=48)
    sharded = make_settings(tmp_path / "sharded", database_url, embedder=str(tiny_embedder))
    reports = [build_index(sharded, corpus, shard=(i, 3), progress=False) for i in range(3)]
    assert sum(r.added for r in reports) == 40 and all(r.index_version_name is None for r in reports)
    merged = merge_shards(sharded, factory="Flat", progress=False)
    assert merged.embedded == 0 and merged.total_indexed == 40  # the shards embedded everything

    single_url = f"sqlite:///{tmp_path / 'single.db'}"
    upgrade(single_url)
    single = make_settings(tmp_path / "single", single_url, embedder=str(tiny_embedder))
    assert build_index(single, corpus, factory="Flat", progress=False).total_indexed == 40

    def neighbours(settings, url: str) -> tuple[dict[str, list[str]], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """By sha256 (ids differ between the two stores): 5 exact neighbours, their scores, the embedding."""
        from app.registry import active_index, active_model
        from index import versions
        from index.vector_index import VectorIndex

        with session_scope(url) as session:
            sha = dict(session.execute(select(Image.id, Image.sha256)).tuples().all())
            path = active_index(session).path
            ids, vectors = versions.load_embeddings(settings.embeddings_dir(active_model(session).name))
        scores, found = VectorIndex.load(path).search(vectors, 5)
        keys = [sha[int(i)] for i in ids]
        return ({key: [sha[int(j)] for j in row] for key, row in zip(keys, found, strict=True)},
                dict(zip(keys, scores, strict=True)), dict(zip(keys, vectors, strict=True)))

    (a, a_scores, a_vecs), (b, b_scores, b_vecs) = neighbours(sharded, database_url), neighbours(single, single_url)
    assert a.keys() == b.keys() and len(a) == 40
    for key in a:
        np.testing.assert_allclose(a_vecs[key], b_vecs[key], atol=2e-3)  # same embeddings, float16 shards
        np.testing.assert_allclose(a_scores[key], b_scores[key], atol=2e-3)  # same neighbour scores
    # Same neighbours, up to near-ties (a random-init embedder puts many images close together).
    assert np.mean([a[key] == b[key] for key in a]) >= 0.5
    assert np.mean([a[key][:2] == b[key][:2] for key in a]) >= 0.9

    # The IVF route: filled IVF copies merged with FAISS's on-disk merge.
    from app.indexing import verify_index
    from index import versions
    from index.vector_index import VectorIndex

    # Rows embedded twice (an actor that committed a shard after its driver died, then a rerun), the second time
    # with other numbers (another runtime, say): each image is indexed once, with the latest shard's vector.
    store = next(p for p in (sharded.data_dir / "embeddings").iterdir() if p.is_dir())
    _, first_ids, first_vectors = next(versions.iter_embedding_shards(store))
    again = np.asarray(first_vectors, dtype=np.float32) + 0.3 * np.random.default_rng(0).standard_normal(
        first_vectors.shape, dtype=np.float32)
    again /= np.linalg.norm(again, axis=1, keepdims=True)
    versions.write_embedding_shard(store, "zz-embedded-again", first_ids, again)
    ivf = merge_shards(sharded, factory="IVF2,Flat", ondisk=True, progress=False)
    version = sharded.indexes_dir / ivf.index_version_name
    assert (version / "merged.ivfdata").exists() and not list(sharded.indexes_dir.glob(".ondisk-*"))
    merged = VectorIndex.load(version)
    assert len(merged) == 40 and verify_index(sharded).ok
    scores, found = merged.search(again, 10, effort="exact")
    assert all(len(set(row[row >= 0])) == len(row[row >= 0]) for row in found)  # no image twice in a result
    assert found[:, 0].tolist() == first_ids.tolist() and scores[:, 0].min() > 0.999  # the latest vectors


def test_verify_catches_planted_inconsistencies(database_url: str, tmp_path: Path, tiny_embedder: Path,
                                                 run_cli: Callable[..., CliResult]) -> None:
    from datetime import UTC, datetime

    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index, verify_index
    from app.registry import active_index
    from index.vector_index import VectorIndex

    corpus = make_corpus(tmp_path / "corpus", per_class=3, size=48)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    build_index(settings, corpus, progress=False)
    ok = run_cli(settings, "index", "verify")
    assert ok.returncode == 0, ok.stderr

    with session_scope(database_url) as session:
        victim = session.scalars(select(Image).order_by(Image.id)).first()
        # Deleted in SQL before the version was built, yet in it (a delete after publishing would be pending).
        victim.deleted_at = datetime(2000, 1, 1, tzinfo=UTC)
        session.add(Image(sha256="f" * 64, uri="/nowhere.jpg", width=1, height=1, meta={}))  # never indexed
        path = active_index(session).path
        deleted_id = victim.id
    index = VectorIndex.load(path)
    index.add([987654], np.ones((1, index.dim), dtype=np.float32) / np.sqrt(index.dim))  # unknown id
    index.save(path)

    report = verify_index(settings)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"images deleted before this version was published, still in it: [{deleted_id}]" in text
    assert "live images missing from the index" in text and "[987654]" in text
    bad = run_cli(settings, "index", "verify")
    assert bad.returncode == 1 and "987654" in bad.stderr and str(deleted_id) in bad.stderr


def test_hnsw_deletions_compact_on_rebuild(database_url: str, tmp_path: Path, tiny_embedder: Path) -> None:
    from datetime import UTC, datetime

    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index, rebuild_index, verify_index
    from app.registry import active_index
    from index.vector_index import VectorIndex

    corpus = make_corpus(tmp_path / "corpus", per_class=4, size=48)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder), keep_versions=1)
    first = build_index(settings, corpus, factory="HNSW16", progress=False)
    with session_scope(database_url) as session:
        gone = session.scalars(select(Image).order_by(Image.id).limit(3)).all()
        for image in gone:
            image.deleted_at = datetime.now(UTC)
        gone_ids = [image.id for image in gone]
        live_index = VectorIndex.load(active_index(session).path)
    live_index.remove(gone_ids)  # what the service does at once: tombstones
    assert len(live_index) == 13 and len(live_index.tombstones) == 3
    report = rebuild_index(settings, factory="HNSW16", progress=False)  # decodes nothing
    assert report.embedded == 0 and report.total_indexed == 13
    compacted = VectorIndex.load(settings.indexes_dir / report.index_version_name)
    assert compacted.ntotal == 13 and len(compacted.tombstones) == 0
    assert not np.isin(compacted.ids(), gone_ids).any()
    assert verify_index(settings).ok
    # keep_versions=1: the older version's directory is pruned, the active one stays.
    assert not (settings.indexes_dir / first.index_version_name).exists()
