"""`retrieval backup DIR` taken while the service serves and writes, then `retrieval restore DIR` into an empty
data dir and database, on SQLite and PostgreSQL: the restored service gives the original's search results (ids,
scores, metadata), online adds and deletes included; restoring over data refuses with a clear message."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.conftest import class_image, jpeg_bytes, make_settings, migrated_url
from tests.test_api_helpers import app_client, build_served_corpus, upload

QUERIES = [("red", 3), ("green", 4), ("blue", 5), ("yellow", 6), ("red", 77)]


def _results(client) -> list[list[tuple[int, float, dict]]]:
    out = []
    for label, seed in QUERIES:
        hits = upload(client, jpeg_bytes(class_image(label, seed=seed)), k=8).json()["results"]
        out.append([(h["id"], round(h["score"], 4), h["metadata"]) for h in hits])
    return out


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_backup_while_serving_then_restore_gives_the_same_results(tmp_path: Path, kind: str, request,
                                                                  run_cli) -> None:
    (tmp_path / "orig").mkdir()
    settings = build_served_corpus(tmp_path / "orig", migrated_url(kind, request, tmp_path / "orig"), per_class=3)
    backup_dir = tmp_path / "backup"
    with app_client(settings, compact_every=0, compact_after_s=0) as client:
        created = upload(client, jpeg_bytes(class_image("yellow", seed=4242)), path="/v1/images", label="yellow",
                         metadata='{"source": "api"}')
        assert created.status_code == 201
        assert client.delete("/v1/images/3").status_code == 204
        expected = _results(client)
        # Queries keep being answered while the backup runs.
        statuses: list[int] = []
        stop = threading.Event()

        def search_loop() -> None:
            while not stop.is_set():
                statuses.append(upload(client, jpeg_bytes(class_image("blue", seed=1)), k=3).status_code)

        searcher = threading.Thread(target=search_loop)
        searcher.start()
        try:
            done = run_cli(settings, "backup", str(backup_dir))
        finally:
            stop.set()
            searcher.join()
        assert done.returncode == 0, done.stderr
        assert statuses and set(statuses) == {200}
    (restored_root := tmp_path / "restored").mkdir()
    restored = make_settings(restored_root / "data", migrated_url(kind, request, restored_root) if kind == "postgresql"
                             else f"sqlite:///{restored_root / 'data' / 'retrieval.db'}",
                             embedder="efficientnet_lite0")  # the model comes from the backup, not this setting
    result = run_cli(restored, "restore", str(backup_dir))
    assert result.returncode == 0, result.stderr
    assert run_cli(restored, "index", "verify").returncode == 0
    with app_client(restored) as client:
        assert client.get("/readyz").status_code == 200
        assert _results(client) == expected
        thumb = client.get(f"/v1/images/{created.json()['id']}/thumbnail")
        assert thumb.status_code == 200  # the uploaded file came back too
    again = run_cli(restored, "restore", str(backup_dir))
    assert again.returncode == 1 and "not empty" in again.stderr
    assert run_cli(settings, "backup", str(backup_dir)).returncode == 1  # never over an existing backup


def test_a_fold_during_the_copy_loses_no_stored_vector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction may fold the API embedding shards (deleting them once the merged shard is committed) while a
    backup copies the store: the copy is taken again, so the backup holds every vector, each counted once (a
    single pass would keep only what it copied before the fold)."""
    import numpy as np

    from app import backup
    from index import versions

    store = tmp_path / "data" / "embeddings" / "model-1"
    vectors = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    for i in range(6):
        versions.write_embedding_shard(store, f"api-{i + 1:012d}-t", np.array([i + 1]), vectors[i : i + 1])
    real_copy, copied = versions.link_or_copy, []

    def copy_then_fold(src: Path, dst: Path) -> None:
        if len(copied) == 2:  # the fold lands after two files were copied
            sources = [s for s in versions.shard_stems(store) if s.startswith("api-")]
            versions.fold_shards(store, sources, "api-000000000000-merged-1")
        copied.append(src.name)
        real_copy(src, dst)

    monkeypatch.setattr(versions, "link_or_copy", copy_then_fold)
    target = tmp_path / "copy"
    backup._copy_live_dir(tmp_path / "data" / "embeddings", target)
    ids, loaded = versions.load_embeddings(target / "model-1")
    assert ids.tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(loaded, vectors, atol=2e-2)
    counted = np.concatenate([np.load(target / "model-1" / f"{s}{versions.IDS_SUFFIX}")
                              for s in versions.shard_stems(target / "model-1")])
    assert sorted(counted.tolist()) == [1, 2, 3, 4, 5, 6]
