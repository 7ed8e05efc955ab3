"""Compaction of online changes, on SQLite and PostgreSQL: API adds and deletes are folded into a new published
version while queries keep coming (none lost), after which `index verify` passes with nothing pending and a
restart has nothing to catch up on; before it, verify counts the changes as pending and still exits 0. Only one
process compacts at a time, and a compaction whose base was replaced meanwhile publishes nothing."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from tests.conftest import class_image, jpeg_bytes
from tests.test_api_helpers import app_client, build_served_corpus, upload
from tests.test_api_lifecycle import wait_for

ADDED = [("red", 901), ("green", 902), ("blue", 903), ("yellow", 904), ("red", 905)]


def _add_and_delete(client, settings: Settings) -> tuple[dict[int, bytes], list[int]]:
    added: dict[int, bytes] = {}
    for label, seed in ADDED:
        data = jpeg_bytes(class_image(label, seed=seed))
        created = upload(client, data, path="/v1/images", label=label)
        assert created.status_code == 201, created.text
        added[created.json()["id"]] = data
    deleted = [1, 2]
    for image_id in deleted:
        assert client.delete(f"/v1/images/{image_id}").status_code == 204
    return added, deleted


def test_verify_counts_online_changes_as_pending(tmp_path: Path, database_url: str, run_cli) -> None:
    settings = build_served_corpus(tmp_path, database_url, per_class=3, compact_every=0, compact_after_s=0)
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        _add_and_delete(client, settings)
        assert client.get("/readyz").json()["detail"]["pending_changes"] == len(ADDED) + 2
    result = run_cli(settings, "index", "verify")
    assert result.returncode == 0, result.stderr
    assert "7 online change(s) pending compaction (5 added, 2 deleted" in result.stdout
    compacted = run_cli(settings, "index", "compact")
    assert compacted.returncode == 0 and "+ 5 added - 2 removed" in compacted.stdout, compacted.stdout
    again = run_cli(settings, "index", "verify")
    assert again.returncode == 0 and "pending" not in again.stdout, again.stdout


def test_compaction_under_queries_loses_nothing(tmp_path: Path, database_url: str, run_cli) -> None:
    settings = build_served_corpus(tmp_path, database_url, per_class=3)
    statuses: list[int] = []
    stop = threading.Event()
    with app_client(settings, compact_every=7, compact_after_s=0) as client:
        first = client.get("/readyz").json()["detail"]["index_version"]
        query = jpeg_bytes(class_image("blue", seed=7))

        def search_loop() -> None:
            while not stop.is_set():
                statuses.append(upload(client, query, k=5).status_code)

        searcher = threading.Thread(target=search_loop)
        searcher.start()
        try:
            added, deleted = _add_and_delete(client, settings)
            detail = wait_for(lambda: (d := client.get("/readyz").json()["detail"])["index_version"] != first
                              and d, timeout=30)
        finally:
            stop.set()
            searcher.join()
        assert detail["last_compaction"]["added"] == len(ADDED) and detail["last_compaction"]["removed"] == 2
        assert detail["pending_changes"] == 0 and detail["vectors"] == 12 + len(ADDED) - 2
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        for image_id, data in added.items():  # its own top-1 (ties within float16 storage's precision)
            hits = upload(client, data, k=3).json()["results"]
            assert image_id in [h["id"] for h in hits if h["score"] >= hits[0]["score"] - 1e-3]
    verify = run_cli(settings, "index", "verify")
    assert verify.returncode == 0 and "pending" not in verify.stdout, verify.stdout + verify.stderr
    # A restart loads the compacted version and has nothing to re-apply.
    with app_client(settings) as client:
        detail = client.get("/readyz").json()["detail"]
        assert detail["index_version"] != first and detail["pending_changes"] == 0
        hits = upload(client, jpeg_bytes(class_image("red", seed=1)), k=50).json()["results"]
        assert not set(deleted) & {h["id"] for h in hits} and len(hits) == 12 + len(ADDED) - 2


def test_one_compaction_at_a_time_and_never_over_a_newer_version(tmp_path: Path, database_url: str,
                                                                 monkeypatch) -> None:
    from sqlalchemy import select

    from app.db import leases
    from app.db.models import IndexVersion
    from app.db.session import session_scope
    from app.indexing.compact import LEASE, compact_index
    from app.indexing.pipeline import rebuild_index
    from index import versions

    settings = build_served_corpus(tmp_path, database_url, per_class=2)
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        _add_and_delete(client, settings)
    url = settings.resolved_database_url
    assert leases.acquire(url, LEASE, "replica-a", 60)
    assert not leases.acquire(url, LEASE, "replica-b", 60)
    assert compact_index(settings, "replica-b").published is None  # skipped: replica-a holds the lease
    leases.release(url, LEASE, "replica-a")
    report = compact_index(settings, "replica-b")
    assert report.published and (report.added, report.removed) == (len(ADDED), 2)
    assert compact_index(settings, "replica-b").published is None  # nothing left to fold in
    # A build published while a compaction runs wins; the compacted version is dropped, not promoted.
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        upload(client, jpeg_bytes(class_image("green", seed=977)), path="/v1/images")
    real_publish, rebuilt = versions.publish, []

    def publish_then_rebuild(indexes_dir, name, write):
        path = real_publish(indexes_dir, name, write)
        if not rebuilt:
            rebuilt.append(True)
            rebuilt.append(rebuild_index(settings, progress=False).index_version_name)
        return path

    monkeypatch.setattr(versions, "publish", publish_then_rebuild)
    report = compact_index(settings, "replica-a")
    assert report.published is None and "replaced while compacting" in report.message
    with session_scope(url) as session:
        assert session.scalar(select(IndexVersion.name).where(IndexVersion.status == "active")) == rebuilt[1]
    dropped = report.message.rsplit("dropped ", 1)[1]
    assert not (settings.indexes_dir / dropped).exists() and not list(settings.indexes_dir.glob(".tmp-*"))


def test_compaction_folds_api_embedding_shards_and_similar_still_answers(tmp_path: Path, run_cli,
                                                                        request: pytest.FixtureRequest) -> None:
    """On an IVF index (no vectors to reconstruct), /similar reads API-added images' vectors from the embedding
    store: after compaction those N one-row shards are one merged shard and the answers are the same, also after
    a restart; an image deleted after its shard was written is left out of the merged shard."""
    from app.indexing.fold import API_SHARD_PREFIX
    from app.indexing.pipeline import rebuild_index
    from index import versions
    from tests.conftest import migrated_url

    settings = build_served_corpus(tmp_path, migrated_url("sqlite", request, tmp_path), per_class=3)
    assert rebuild_index(settings, factory="IVF2,Flat", progress=False).factory == "IVF2,Flat"
    store = next(settings.data_dir.glob("embeddings/*"))
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        added = [upload(client, jpeg_bytes(class_image(label, seed=seed)), path="/v1/images").json()["id"]
                 for label, seed in ADDED]
        gone = added.pop()
        assert client.delete(f"/v1/images/{gone}").status_code == 204
        assert client.app.state.deployment.reconstruct(added[0]) is None  # IVF: from the store
        similar = {i: client.get(f"/v1/images/{i}/similar", params={"k": 5}).json()["results"] for i in added}
        assert all(len(hits) == 5 for hits in similar.values())
    api_files = sorted(p.name for p in store.iterdir() if p.name.startswith(f"{API_SHARD_PREFIX}-"))
    assert len(api_files) == 2 * len(ADDED)
    old = time.time() - 60  # as if written a minute before the delete
    for name in api_files:
        os.utime(store / name, (old, old))
    compacted = run_cli(settings, "index", "compact")
    assert compacted.returncode == 0 and f"{len(ADDED)} API embedding shards folded into one" in compacted.stdout
    api_stems = [s for s in versions.shard_stems(store) if s.startswith(f"{API_SHARD_PREFIX}-")]
    assert len(api_stems) == 1 and not set(api_files) & {p.name for p in store.iterdir()}
    assert sorted(np.load(store / f"{api_stems[0]}{versions.IDS_SUFFIX}").tolist()) == sorted(added)
    verify = run_cli(settings, "index", "verify")
    assert verify.returncode == 0 and "pending" not in verify.stdout, verify.stdout + verify.stderr
    with app_client(settings) as client:  # a restart: the compacted version, vectors from the merged shard
        for image_id in added:
            hits = client.get(f"/v1/images/{image_id}/similar", params={"k": 5}).json()["results"]
            assert [h["id"] for h in hits] == [h["id"] for h in similar[image_id]], (image_id, hits)
            assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in similar[image_id]], abs=1e-4)
