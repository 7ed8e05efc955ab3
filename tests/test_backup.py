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
    compact = run_cli(restored, "index", "compact")  # no lease of the backup's came along
    assert compact.returncode == 0 and "another process" not in compact.stdout.lower(), compact.stdout
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


# --- restores that must not carry a lock, and restores that fail -----------------------------------------------


def _small_instance(root: Path, labels: list[str]):
    """A SQLite instance with a few uploaded images (rows and files) and no index: enough for backup and restore."""
    import hashlib

    from app.db.models import Image
    from app.db.session import session_scope

    settings = make_settings(root / "data", f"sqlite:///{root / 'data' / 'retrieval.db'}")
    settings.images_dir.mkdir(parents=True)
    migrated_url("sqlite", None, settings.data_dir)
    with session_scope(settings.resolved_database_url) as session:
        for seed, label in enumerate(labels):
            data = jpeg_bytes(class_image("red", seed=seed))
            path = settings.images_dir / f"{hashlib.sha256(data).hexdigest()}.jpg"
            path.write_bytes(data)
            session.add(Image(sha256=path.stem, uri=str(path), label=label, width=96, height=96, meta={}))
    return settings


def _target(kind: str, request, root: Path, migrated: bool = False):
    """Where a restore goes: a data dir that does not exist yet, and a database that is new (PostgreSQL: created,
    no tables; SQLite: no file) or, with `migrated`, already through `retrieval db upgrade`."""
    from app.db.migrate import upgrade

    if kind == "postgresql":
        url = request.getfixturevalue("postgres_server").create_database()
    else:
        url = f"sqlite:///{root / 'data' / 'retrieval.db'}"
    if migrated:
        (root / "data").mkdir(parents=True, exist_ok=True)
        upgrade(url)
    return make_settings(root / "data", url)


def _tables(url: str) -> set[str]:
    from sqlalchemy import inspect

    from app.db.session import get_engine

    with get_engine(url).connect() as conn:
        return set(inspect(conn).get_table_names())


def _rows(url: str) -> dict[str, int]:
    from sqlalchemy import func, select

    from app.db.models import Base
    from app.db.session import get_engine

    present = _tables(url)
    with get_engine(url).connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in Base.metadata.sorted_tables if t.name in present}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_restored_instance_holds_no_lease_of_the_backup(tmp_path: Path, kind: str, request, run_cli) -> None:
    """The backup holds the compaction lease while it takes its snapshot: the row is not in the backup, and a
    backup made before that (which lists it) restores without it, so the restored instance compacts and backs up
    at once instead of 'Another process is compacting; skipped' and a backup waiting up to 600 s."""
    import json
    from datetime import UTC, datetime, timedelta

    from app.db import migrate

    source = _small_instance(tmp_path / "orig", ["a", "b"])
    assert run_cli(source, "backup", str(tmp_path / "bk1")).returncode == 0
    manifest = json.loads((tmp_path / "bk1" / "manifest.json").read_text())
    assert "leases" not in manifest["rows"]
    assert "leases" not in json.loads((tmp_path / "bk1" / "database.json").read_text())
    # What an older version wrote: its own lease, held for 600 s past the snapshot.
    database = json.loads((tmp_path / "bk1" / "database.json").read_text())
    until = (datetime.now(UTC) + timedelta(seconds=600)).isoformat()
    database["leases"] = [{"name": "compact_index", "owner": "backup-host-1-abcdef", "expires_at": until}]
    (tmp_path / "bk1" / "database.json").write_text(json.dumps(database))

    restored = _target(kind, request, tmp_path / "restored")
    done = run_cli(restored, "restore", str(tmp_path / "bk1"))
    assert done.returncode == 0, done.stderr
    url = restored.resolved_database_url
    assert _rows(url)["leases"] == 0 and _rows(url)["images"] == 2
    assert migrate.current(url) == migrate.current(source.resolved_database_url)
    compact = run_cli(restored, "index", "compact")
    assert compact.returncode == 0 and "another process" not in compact.stdout.lower(), compact.stdout
    again = run_cli(restored, "backup", str(tmp_path / "bk2"))
    assert again.returncode == 0, again.stderr


def test_a_backup_waiting_for_the_lease_says_who_holds_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A backup that must wait for the compaction lease (up to its 600 s) says so, with the holder and until when,
    instead of hanging silently."""
    import logging

    from app import backup
    from app.db import leases

    source = _small_instance(tmp_path / "orig", ["a"])
    assert leases.acquire(source.resolved_database_url, "compact_index", "compactor-on-host-b", 1.5)
    with caplog.at_level(logging.WARNING, logger="app.backup"):
        backup.backup(source, tmp_path / "bk")
    said = [r.getMessage() for r in caplog.records if r.name == "app.backup"]
    assert len(said) == 1 and "held by compactor-on-host-b until" in said[0] and "waiting" in said[0], said
    assert leases.holder(source.resolved_database_url, "compact_index") is None  # given back


def test_a_label_postgresql_refuses_is_named_before_anything_is_written(tmp_path: Path, request, run_cli) -> None:
    """SQLite stored a label over images.label's 255 characters (a build from deep folders can write one);
    PostgreSQL refuses it. The restore says which image and column before it writes anything (no truncation);
    the same backup restores into SQLite whole."""
    source = _small_instance(tmp_path / "orig", ["ok", "x" * 300, "fine"])
    assert run_cli(source, "backup", str(tmp_path / "bk")).returncode == 0
    target = _target("postgresql", request, tmp_path / "pg")
    refused = run_cli(target, "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1
    line = refused.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "images row id=2: label is 300 characters" in line and "at most 255" in line, line
    assert "PATCH /v1/images/2" in line and "Nothing was written" in line, line
    assert not (tmp_path / "pg" / "data").exists()
    assert _tables(target.resolved_database_url) == set()  # not even migrated
    into_sqlite = _target("sqlite", request, tmp_path / "lite")
    assert run_cli(into_sqlite, "restore", str(tmp_path / "bk")).returncode == 0
    from app.db.models import Image
    from app.db.session import session_scope

    with session_scope(into_sqlite.resolved_database_url) as session:
        assert session.get(Image, 2).label == "x" * 300


@pytest.mark.parametrize("migrated", [False, True], ids=["new", "db-upgraded"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_restore_that_fails_half_way_leaves_the_target_as_it_found_it(tmp_path: Path, kind: str,
                                                                          migrated: bool, request, run_cli) -> None:
    """A row the database refuses once the files are copied (here two images with the same sha256, written into
    the backup by hand): one line names the row and the reason, the rows are rolled back, the migrations the
    restore ran are undone and the files it copied removed, so the same command with a good backup then works."""
    import json

    from app.db import migrate

    source = _small_instance(tmp_path / "orig", ["a", "b", "c"])
    assert run_cli(source, "backup", str(tmp_path / "good")).returncode == 0
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tmp_path / "good", bad)
    database = json.loads((bad / "database.json").read_text())
    database["images"][2]["sha256"] = database["images"][0]["sha256"]
    (bad / "database.json").write_text(json.dumps(database))

    target = _target(kind, request, tmp_path / "target", migrated=migrated)
    url = target.resolved_database_url
    before = (migrate.current(url) if migrated else None, sorted(_tables(url)) if kind == "postgresql" or migrated
              else None)
    failed = run_cli(target, "restore", str(bad))
    assert failed.returncode == 1
    line = failed.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "the database refused images row id=3" in line and "sha256" in line.lower(), line
    assert "nothing was kept" in line, line
    if migrated:  # the data dir was there (with the SQLite file): only what the restore wrote is gone
        assert sorted(p.name for p in (tmp_path / "target" / "data").iterdir()
                      if not p.name.startswith("retrieval.db")) == []
        assert (migrate.current(url), sorted(_tables(url))) == before
        assert set(_rows(url).values()) == {0}
    else:
        assert not (tmp_path / "target" / "data").exists()
        if kind == "postgresql":
            assert migrate.current(url) is None and _tables(url) <= {"alembic_version"}
    retried = run_cli(target, "restore", str(tmp_path / "good"))
    assert retried.returncode == 0, retried.stderr
    assert _rows(url)["images"] == 3


@pytest.mark.parametrize("migrated", [False, True], ids=["new", "db-upgraded"])
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_restore_failing_after_its_rows_committed_takes_them_back(tmp_path: Path, kind: str, migrated: bool,
                                                                    request, run_cli,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step (migrating the restored rows to the current schema) fails: the committed rows are deleted
    and the schema taken back to where it was (none, or this code's for a target already through `retrieval db
    upgrade`, whose tables stay, empty), and the line says what failed."""
    from app import backup
    from app.db import migrate

    source = _small_instance(tmp_path / "orig", ["a"])
    assert run_cli(source, "backup", str(tmp_path / "bk")).returncode == 0
    target = _target(kind, request, tmp_path / "target", migrated=migrated)
    url = target.resolved_database_url
    before = (migrate.current(url), sorted(_tables(url))) if migrated else None
    real_upgrade, calls = migrate.upgrade, []

    def upgrade_then_fail(url: str, revision: str = "head") -> None:
        calls.append(revision)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_upgrade(url, revision)

    monkeypatch.setattr(backup.migrate, "upgrade", upgrade_then_fail)
    failed = run_cli(target, "restore", str(tmp_path / "bk"))
    assert failed.returncode == 1
    assert "restore failed: [Errno 28] No space left on device" in failed.stderr, failed.stderr
    assert "nothing was kept" in failed.stderr
    if migrated:  # the rows it committed deleted, the schema kept
        assert (migrate.current(url), sorted(_tables(url))) == before
        assert set(_rows(url).values()) == {0}
        assert [p.name for p in (tmp_path / "target" / "data").iterdir() if not p.name.startswith("retrieval.db")] == []
        return
    assert not (tmp_path / "target" / "data").exists()
    if kind == "postgresql":
        assert migrate.current(url) is None and _tables(url) <= {"alembic_version"}


def test_restore_into_the_images_fresh_data_volume(tmp_path: Path, run_cli) -> None:
    """The image's /data is never bare: it holds tmp/ (TMPDIR) and, once torch is imported, .cache/. Those do not
    make it 'not empty'; anything else does, and is named."""
    source = _small_instance(tmp_path / "orig", ["a"])
    assert run_cli(source, "backup", str(tmp_path / "bk")).returncode == 0
    volume = tmp_path / "volume"
    (volume / "tmp").mkdir(parents=True)
    (volume / ".cache" / "torchinductor").mkdir(parents=True)
    target = make_settings(volume, f"sqlite:///{volume / 'retrieval.db'}")
    done = run_cli(target, "restore", str(tmp_path / "bk"))
    assert done.returncode == 0, done.stderr
    assert (volume / "tmp").is_dir() and (volume / ".cache" / "torchinductor").is_dir()
    other = tmp_path / "other"
    (other / "models").mkdir(parents=True)
    refused = run_cli(make_settings(other, f"sqlite:///{other / 'retrieval.db'}"), "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "is not empty (models)" in refused.stderr, refused.stderr
