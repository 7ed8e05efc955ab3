"""Sources and corpora a new user meets first: class folders that are symlinks, a folder with no image in it,
and a service whose corpus is empty (it must be ready, answer searches with nothing, and take the first add)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import CLASS_COLOURS, REPO, class_image, jpeg_bytes, make_settings, migrated_url, settings_env
from tests.test_api_helpers import save_tiny_embedder, start_server, upload
from tests.test_indexing import make_corpus


def cli(settings, *args: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=settings_env(settings),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    # Where files come from and what an empty index holds does not depend on the database: SQLite only.
    url = migrated_url("sqlite", request, tmp_path)
    return make_settings(tmp_path / "data", url, embedder=str(save_tiny_embedder(tmp_path / "tiny")))


def test_build_follows_symlinked_class_folders_and_survives_a_link_loop(settings, tmp_path: Path) -> None:
    from app.db.models import Image
    from app.db.session import session_scope

    real = make_corpus(tmp_path / "photos", per_class=3)  # photos/<colour>/<n>.jpg
    source = tmp_path / "dataset"
    source.mkdir()
    for label in CLASS_COLOURS:
        (source / f"class-{label}").symlink_to(real / label, target_is_directory=True)
    (real / "red" / "loop").symlink_to(real, target_is_directory=True)  # a loop: photos/red/loop -> photos

    built = cli(settings, "index", "build", str(source), "--no-progress")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "added 12 new images" in built.stdout
    assert "published index" in built.stdout and "12 vectors" in built.stdout
    with session_scope(settings.resolved_database_url) as session:
        labels = sorted(label for (label,) in session.query(Image.label).filter(Image.deleted_at.is_(None)))
    # Labels are the link names; the loop (a link back to photos/) is skipped, not followed forever.
    assert labels == sorted(f"class-{label}" for label in CLASS_COLOURS for _ in range(3))
    assert cli(settings, "index", "verify").returncode == 0


def test_a_source_without_images_is_an_error_and_keeps_the_active_index(settings, tmp_path: Path) -> None:
    from app.db.models import IndexVersion
    from app.db.session import session_scope
    from app.registry import active_index

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no image here")
    first = cli(settings, "index", "build", str(empty), "--no-progress")
    assert first.returncode == 1 and "no image file under" in first.stderr, first.stdout + first.stderr

    corpus = make_corpus(tmp_path / "corpus", per_class=2)
    assert cli(settings, "index", "build", str(corpus), "--no-progress").returncode == 0
    with session_scope(settings.resolved_database_url) as session:
        before = active_index(session).name
    again = cli(settings, "index", "build", str(empty), "--no-progress")
    assert again.returncode == 1 and "no image file under" in again.stderr
    with session_scope(settings.resolved_database_url) as session:
        assert active_index(session).name == before and active_index(session).ntotal == 8
        assert session.query(IndexVersion).count() == 1


def test_an_empty_index_serves_and_the_first_add_starts_the_corpus(settings, tmp_path: Path) -> None:
    from app.db.session import session_scope
    from app.indexing import rebuild_index
    from app.registry import active_index
    from index.builders import build

    report = rebuild_index(settings, progress=False)  # nothing stored: publishes an empty index
    assert report.index_version_name is not None and report.total_indexed == 0
    with session_scope(settings.resolved_database_url) as session:
        path = Path(active_index(session).path)
    # Replace it with what older builds published for an empty folder (dimension 0): the service must cope.
    build(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)).save(path)

    server = start_server(settings, tmp_path / "server.log")
    base = server.base_url
    try:
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and ready.json()["detail"]["vectors"] == 0, ready.text
        query = jpeg_bytes(class_image("blue", seed=7))
        nothing = upload(base, query, k=5)
        assert nothing.status_code == 200 and nothing.json()["results"] == [], nothing.text

        added = upload(base, query, path="/v1/images", label="blue")
        assert added.status_code == 201, added.text
        hits = upload(base, query, k=5).json()["results"]
        assert [h["id"] for h in hits] == [added.json()["id"]] and hits[0]["score"] > 0.99

        server.stop()  # the added image is in the embedding store: a restart serves it again
        server.start()
        assert httpx.get(f"{base}/readyz").json()["detail"]["vectors"] == 1
        assert upload(base, query, k=5).json()["results"][0]["id"] == added.json()["id"]
    finally:
        server.stop()
