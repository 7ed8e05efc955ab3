"""Sources and corpora a new user meets first: class folders that are symlinks, a folder with no image in it,
a service whose corpus is empty (it must be ready, answer searches with nothing, and take the first add), and a
GPU asked for on a machine without one.
The CLI and the app run in this process: what is tested is what they do with the files, not the process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from tests.conftest import CLASS_COLOURS, CliResult, class_image, jpeg_bytes, make_settings, migrated_url
from tests.test_api_helpers import app_client, save_tiny_embedder, upload
from tests.test_indexing import make_corpus

Cli = Callable[..., CliResult]


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    # Where files come from and what an empty index holds does not depend on the database: SQLite only.
    url = migrated_url("sqlite", request, tmp_path)
    return make_settings(tmp_path / "data", url, embedder=str(save_tiny_embedder(tmp_path / "tiny")))


def test_build_follows_symlinked_class_folders_and_survives_a_link_loop(settings: Settings, tmp_path: Path,
                                                                        run_cli: Cli) -> None:
    from app.db.models import Image
    from app.db.session import session_scope

    real = make_corpus(tmp_path / "photos", per_class=3)  # photos/<colour>/<n>.jpg
    source = tmp_path / "dataset"
    source.mkdir()
    for label in CLASS_COLOURS:
        (source / f"class-{label}").symlink_to(real / label, target_is_directory=True)
    (real / "red" / "loop").symlink_to(real, target_is_directory=True)  # a loop: photos/red/loop -> photos

    built = run_cli(settings, "index", "build", str(source), "--no-progress")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "added 12 new images" in built.stdout
    assert "published index" in built.stdout and "12 vectors" in built.stdout
    with session_scope(settings.resolved_database_url) as session:
        labels = sorted(label for (label,) in session.query(Image.label).filter(Image.deleted_at.is_(None)))
    # Labels are the link names; the loop (a link back to photos/) is skipped, not followed forever.
    assert labels == sorted(f"class-{label}" for label in CLASS_COLOURS for _ in range(3))
    assert run_cli(settings, "index", "verify").returncode == 0


def test_a_source_without_images_is_an_error_and_keeps_the_active_index(settings: Settings, tmp_path: Path,
                                                                        run_cli: Cli) -> None:
    from app.db.models import IndexVersion
    from app.db.session import session_scope
    from app.registry import active_index

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no image here")
    first = run_cli(settings, "index", "build", str(empty), "--no-progress")
    assert first.returncode == 1 and "no image file under" in first.stderr, first.stdout + first.stderr

    corpus = make_corpus(tmp_path / "corpus", per_class=2)
    assert run_cli(settings, "index", "build", str(corpus), "--no-progress").returncode == 0
    with session_scope(settings.resolved_database_url) as session:
        before = active_index(session).name
    again = run_cli(settings, "index", "build", str(empty), "--no-progress")
    assert again.returncode == 1 and "no image file under" in again.stderr
    with session_scope(settings.resolved_database_url) as session:
        assert active_index(session).name == before and active_index(session).ntotal == 8
        assert session.query(IndexVersion).count() == 1


def test_a_gpu_this_machine_lacks_is_said_before_anything_is_registered_or_served(settings: Settings,
                                                                                   tmp_path: Path,
                                                                                   run_cli: Cli) -> None:
    from app.db.models import Image
    from app.db.session import session_scope
    from models.embedder import DeviceUnavailable, resolve_device

    with pytest.raises(DeviceUnavailable, match="is not one torch knows: use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    corpus = make_corpus(tmp_path / "corpus", per_class=2)
    absent = "cuda:99"  # no machine here has 100 GPUs; this one has none
    build = run_cli(settings, "index", "build", str(corpus), "--no-progress", device=absent)
    assert build.returncode == 2, build.stdout + build.stderr
    assert f"device '{absent}' was asked for, but" in build.stderr and "RETRIEVAL_DEVICE" in build.stderr
    assert "Traceback" not in build.stderr
    with session_scope(settings.resolved_database_url) as session:
        assert session.query(Image).count() == 0  # refused before registering

    assert run_cli(settings, "index", "build", str(corpus), "--no-progress").returncode == 0
    with app_client(settings, device=absent) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and f"device '{absent}' was asked for" in ready.json()["detail"]["index"]
        search = upload(client, jpeg_bytes(class_image("red", 0)))
        assert search.status_code == 503 and search.json()["error"] == "not_ready"
        assert f"device '{absent}' was asked for" in search.json()["message"]  # not "build an index first"


def test_an_empty_index_serves_and_the_first_add_starts_the_corpus(settings: Settings) -> None:
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

    query = jpeg_bytes(class_image("blue", seed=7))
    with app_client(settings) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["detail"]["vectors"] == 0, ready.text
        nothing = upload(client, query, k=5)
        assert nothing.status_code == 200 and nothing.json()["results"] == [], nothing.text

        added = upload(client, query, path="/v1/images", label="blue")
        assert added.status_code == 201, added.text
        hits = upload(client, query, k=5).json()["results"]
        assert [h["id"] for h in hits] == [added.json()["id"]] and hits[0]["score"] > 0.99

    # The added image is in the embedding store: a restart (a new app loading from disk) serves it again.
    with app_client(settings) as client:
        assert client.get("/readyz").json()["detail"]["vectors"] == 1
        assert upload(client, query, k=5).json()["results"][0]["id"] == added.json()["id"]
