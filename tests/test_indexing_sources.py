"""Sources as users keep them: folders that change between builds, folders that hold the data dir or hidden
folders, manifests saved by spreadsheets, one photo, and the CLI's one-line answers to a source or type it
cannot use."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from tests.conftest import class_image, make_settings, migrated_url
from tests.test_indexing import make_corpus


def live_rows(settings) -> dict[str, object]:
    from app.db.models import Image
    from app.db.session import session_scope

    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Image).where(Image.deleted_at.is_(None))).all()
        session.expunge_all()
    return {row.uri: row for row in rows}


def indexed_ids(settings) -> list[int]:
    from app.db.session import session_scope
    from app.registry import active_index
    from index.vector_index import VectorIndex

    with session_scope(settings.resolved_database_url) as session:
        path = active_index(session).path
    return sorted(VectorIndex.load(path).ids().tolist())


def test_a_folder_that_changed_since_its_build(database_url: str, tmp_path: Path, tiny_embedder: Path) -> None:
    """Renamed: the row follows the file. Overwritten: the old row (its vector, its thumbnail) is retired.
    Deleted: listed and kept searchable, retired by --prune. The index follows each time."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index, verify_index

    corpus = make_corpus(tmp_path / "corpus", per_class=3)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    build_index(settings, corpus, progress=False)
    before = live_rows(settings)
    renamed, overwritten, deleted = corpus / "red" / "0.jpg", corpus / "green" / "1.jpg", corpus / "blue" / "2.jpg"
    renamed_id, overwritten_id = before[str(renamed)].id, before[str(overwritten)].id
    renamed.rename(corpus / "green" / "holiday.jpg")  # to another sub-folder: relabelled
    class_image("yellow", seed=777, size=64).save(overwritten, quality=90)
    deleted.unlink()

    report = build_index(settings, corpus, progress=False)
    assert (report.moved, report.replaced, report.added, report.gone) == (1, 1, 1, [str(deleted)])
    assert "1 image registered from this folder no longer there" in report.summary()
    rows = live_rows(settings)
    assert (rows[str(corpus / "green" / "holiday.jpg")].id, rows[str(corpus / "green" / "holiday.jpg")].label) == (
        renamed_id, "green")
    assert rows[str(overwritten)].id != overwritten_id  # one live row per path: the new bytes
    assert str(deleted) in rows  # still searchable: an unmounted folder must not empty the index
    with session_scope(settings.resolved_database_url) as session:
        retired = session.get(Image, overwritten_id)
        assert retired.deleted_at is not None and "overwritten" in retired.meta["retired"]
    assert indexed_ids(settings) == sorted(row.id for row in rows.values())
    checked = verify_index(settings)  # SQL and the index agree; the file that left is said, not a problem
    assert checked.ok and checked.missing_files == [str(deleted)]

    pruned = build_index(settings, corpus, progress=False, prune=True)
    assert pruned.pruned == 1 and "retired 1 image whose file left the folder" in pruned.summary()
    rows = live_rows(settings)
    assert str(deleted) not in rows and len(rows) == 11
    assert indexed_ids(settings) == sorted(row.id for row in rows.values())
    assert verify_index(settings).ok and verify_index(settings).missing_files == []
    assert build_index(settings, corpus, progress=False).gone == []


def test_rows_follow_swaps_copies_reverts_and_returns(database_url: str, tmp_path: Path,
                                                      tiny_embedder: Path) -> None:
    """Whatever the edits, each live row's path holds its bytes, and retired bytes that come back come back."""
    from app.indexing import build_index

    corpus = make_corpus(tmp_path / "corpus", per_class=2)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    build_index(settings, corpus, progress=False)
    red0, red1, green0, blue0 = (corpus / "red" / "0.jpg", corpus / "red" / "1.jpg", corpus / "green" / "0.jpg",
                                 corpus / "blue" / "0.jpg")
    original = {path: path.read_bytes() for path in (red0, red1, green0, blue0)}

    def each_row_holds_its_file() -> None:
        import hashlib

        for uri, row in live_rows(settings).items():
            assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == row.sha256, uri
        assert indexed_ids(settings) == sorted(row.id for row in live_rows(settings).values())

    red0.write_bytes(original[red1])  # names swapped
    red1.write_bytes(original[red0])
    shutil.copy(green0, corpus / "green" / "green0-original.jpg")  # a copy kept, then the file edited
    class_image("yellow", seed=555, size=64).save(green0, quality=90)
    report = build_index(settings, corpus, progress=False)
    assert (report.moved, report.replaced) == (3, 0) and report.added == 1
    each_row_holds_its_file()

    class_image("yellow", seed=556, size=64).save(blue0, quality=90)  # edited, then the edit undone
    assert build_index(settings, corpus, progress=False).replaced == 1
    blue0.write_bytes(original[blue0])
    report = build_index(settings, corpus, progress=False)
    assert (report.revived, report.replaced) == (1, 1)
    each_row_holds_its_file()

    kept = tmp_path / "kept.jpg"  # pruned while away, then back
    shutil.move(red0, kept)
    assert build_index(settings, corpus, progress=False, prune=True).pruned == 1
    shutil.move(kept, red0)
    assert build_index(settings, corpus, progress=False).revived == 1
    each_row_holds_its_file()
    assert len(live_rows(settings)) == 9


def test_prune_retires_only_what_left_this_very_folder(tmp_path: Path, tiny_embedder: Path, request) -> None:
    """/x/Photos is not /x/photos, though SQLite's LIKE ignores case; an empty folder is not a pruned one."""
    from app.indexing import EmptySource, build_index

    lower, upper = make_corpus(tmp_path / "photos", per_class=1), tmp_path / "Photos"
    for n, label in enumerate(("red", "green")):
        (upper / label).mkdir(parents=True)
        class_image(label, seed=5000 + n, size=64).save(upper / label / "0.jpg")
    settings = make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path), embedder=str(tiny_embedder))
    build_index(settings, upper, progress=False)
    build_index(settings, lower, progress=False)
    (upper / "red" / "0.jpg").unlink()
    report = build_index(settings, lower, progress=False, prune=True)
    assert report.gone == [] and report.pruned == 0 and len(live_rows(settings)) == 6
    assert build_index(settings, upper, progress=False).gone == [str(upper / "red" / "0.jpg")]
    # Nothing there at all (a drive not mounted, a wrong path): the build stops, --prune retires nothing.
    for label in ("red", "green", "blue", "yellow"):
        shutil.rmtree(lower / label)
    with pytest.raises(EmptySource):
        build_index(settings, lower, progress=False, prune=True)
    assert len(live_rows(settings)) == 6

def test_the_data_dir_and_hidden_folders_in_a_source_stay_out(tmp_path: Path, tiny_embedder: Path,
                                                              request) -> None:
    """`retrieval index build .` in a photo folder that holds ./data: the service's thumbnails and stored uploads
    are not photos of the folder (each would come back as a near-duplicate), nor are .git or .thumbnails; an
    upload kept in the data dir is not "gone from the folder" either."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index

    photos = make_corpus(tmp_path / "photos", per_class=2)
    settings = make_settings(photos / "data", migrated_url("sqlite", request, tmp_path), embedder=str(tiny_embedder))
    for folder in (photos / "data" / "thumbnails" / "ab", photos / ".thumbnails", photos / "red" / ".git"):
        folder.mkdir(parents=True)
        shutil.copy(photos / "red" / "0.jpg", folder / "copy.jpg")
        class_image("blue", seed=99, size=64).save(folder / "other.jpg")
    report = build_index(settings, photos, progress=False)
    assert report.added == 8 and not report.failed
    assert {Path(uri).parent.name for uri in live_rows(settings)} == {"red", "green", "blue", "yellow"}

    with session_scope(settings.resolved_database_url) as session:  # an upload whose file lives in the data dir
        session.add(Image(sha256="0" * 64, uri=str(photos / "data" / "images" / "00" / "gone.jpg"), width=1,
                          height=1, meta={}))
    assert build_index(settings, photos, progress=False).gone == []


def test_manifests_as_spreadsheets_save_them_and_one_photo(database_url: str, tmp_path: Path,
                                                           tiny_embedder: Path) -> None:
    """Excel's "CSV UTF-8" (a byte-order mark), ';' separators and 'Path' / 'Label' headers read as written;
    metadata columns keep their names; a phone photo's size is stored upright, as the API stores an upload's."""
    from app.indexing import build_index

    make_corpus(tmp_path / "images", per_class=1)
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes('\ufeffPath;Label;Camera;Note\nimages/red/0.jpg;rouge;Pixel 8;"a 12"" print; framed"\n'
                         'images/blue/0.jpg;bleu;;\n'.encode("utf-8"))
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    report = build_index(settings, manifest, progress=False)
    assert report.added == 2 and not report.failed
    rows = {Path(uri).parent.name: row for uri, row in live_rows(settings).items()}
    assert (rows["red"].label, rows["red"].meta) == ("rouge", {"Camera": "Pixel 8", "Note": 'a 12" print; framed'})
    assert (rows["blue"].label, rows["blue"].meta) == ("bleu", {})

    photo = tmp_path / "IMG_0001.JPG"  # 80x40 as stored, orientation 6: a 40x80 portrait
    exif = PILImage.Exif()
    exif[0x0112] = 6
    PILImage.fromarray(np.full((40, 80, 3), 120, dtype=np.uint8)).save(photo, exif=exif)
    assert build_index(settings, photo, progress=False).added == 1
    row = live_rows(settings)[str(photo)]
    assert (row.width, row.height, row.label) == (40, 80, None)


def test_an_edited_manifest_run_again_updates_its_images(database_url: str, tmp_path: Path,
                                                         tiny_embedder: Path) -> None:
    """A label corrected and a column changed in the manifest reach the images it lists on the next run (searches
    filter on them at once); keys the manifest does not list, set through the API, stay. A row no database column
    can hold (a label over 255 characters) and a URL are failures of their own, not of the whole build."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index
    from tests.test_api_helpers import app_client

    make_corpus(tmp_path / "images", per_class=1)
    manifest = tmp_path / "catalogue.csv"
    manifest.write_text("path,label,colour\nimages/red/0.jpg,cardinal,red\nimages/blue/0.jpg,jay,blue\n")
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    assert build_index(settings, manifest, progress=False).added == 2
    red = next(row for uri, row in live_rows(settings).items() if "/red/" in uri)
    with session_scope(settings.resolved_database_url) as session:  # a key set through the API
        session.get(Image, red.id).meta = {**red.meta, "reviewed": True}

    long_label = "L" * 300
    manifest.write_text("path,label,colour\nimages/red/0.jpg,northern cardinal,crimson\nimages/blue/0.jpg,jay,\n"
                        f"images/green/0.jpg,{long_label},green\nhttps://example.com/bird.jpg,finch,\n"
                        "images/yellow/0.jpg,canary,yellow\n")
    report = build_index(settings, manifest, progress=False)
    assert (report.added, report.updated) == (1, 1), report.summary()
    assert "1 registered image given the label or metadata the manifest now lists" in report.summary()
    reasons = dict(report.failed)
    assert reasons[str(tmp_path / "images" / "green" / "0.jpg")] == ("its label is 300 characters long; labels "
                                                                     "are at most 255")
    assert "https://example.com/bird.jpg is a URL" in next(r for p, r in reasons.items() if "example.com" in p)
    rows = {Path(uri).parent.name: row for uri, row in live_rows(settings).items()}
    assert (rows["red"].label, rows["red"].meta) == ("northern cardinal", {"colour": "crimson", "reviewed": True})
    assert (rows["blue"].label, rows["blue"].meta) == ("jay", {"colour": "blue"})  # an empty cell keeps the value
    assert rows["yellow"].label == "canary" and "green" not in rows
    with app_client(settings) as client:
        found = client.get("/v1/images", params={"label": "northern cardinal"}).json()["items"]
        assert [item["id"] for item in found] == [red.id]
        assert client.get("/v1/images", params={"label": "cardinal"}).json()["items"] == []


def test_a_build_says_when_the_embedder_setting_did_not_apply(tmp_path: Path, tiny_embedder: Path,
                                                               request) -> None:
    """RETRIEVAL_EMBEDDER picks the first model only: a later build with another one says so and how to move."""
    from app.indexing import build_index
    from tests.test_api_helpers import save_tiny_embedder

    corpus = make_corpus(tmp_path / "corpus", per_class=1)
    url = migrated_url("sqlite", request, tmp_path)
    build_index(make_settings(tmp_path / "data", url, embedder=str(tiny_embedder)), corpus, progress=False)
    other = save_tiny_embedder(tmp_path / "other-embedder", seed=1)
    report = build_index(make_settings(tmp_path / "data", url, embedder=str(other)), corpus, progress=False)
    assert (f"note: embedded with the active model {tiny_embedder.name}, not RETRIEVAL_EMBEDDER={other} (it only "
            f"picks the first model); to move the corpus to it: retrieval jobs submit reembed --set "
            f"model_version={other}") in report.summary()


def test_the_cli_says_in_one_line_what_it_cannot_use(tmp_path: Path, tiny_embedder: Path, request,
                                                     run_cli) -> None:
    settings = make_settings(tmp_path / "data", migrated_url("sqlite", request, tmp_path), embedder=str(tiny_embedder))
    notes = tmp_path / "notes.txt"
    notes.write_text("call the framer about the prints\n")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\nimages/caf\xe9.jpg,caf\xe9\n".encode("latin-1"))
    corpus = make_corpus(tmp_path / "corpus", per_class=1)

    header_only = tmp_path / "empty.csv"
    header_only.write_text("path,label\n")
    for source, said in ((notes, "neither an image nor a CSV manifest with a 'path' column"),
                         (latin1, "save it as CSV UTF-8"), (header_only, "lists no image")):
        result = run_cli(settings, "index", "build", str(source), "--no-progress")
        assert result.returncode == 1 and said in result.stderr and "Traceback" not in result.stderr
    # A type FAISS cannot parse is refused before any image is registered or embedded.
    result = run_cli(settings, "index", "build", str(corpus), "--factory", "NotAFactory", "--no-progress")
    assert result.returncode == 1 and "could not parse index string NotAFactory" in result.stderr
    assert live_rows(settings) == {}
    assert run_cli(settings, "index", "build", str(corpus), "--no-progress").returncode == 0
    result = run_cli(settings, "index", "rebuild", "--factory", "IVF1024,Flat", "--no-progress")
    assert result.returncode == 1 and "needs at least 1024 vectors to train, and there are 4" in result.stderr

    for args, said in ((["serve", "--port", "99999"], "a TCP port is 1-65535"),
                       (["serve", "--workers", "0"], "needs an integer >= 1"),
                       (["jobs", "submit", "rebuild_index", "--params", "{bad"], "not valid JSON"),
                       (["keys", "create", "ci", "--scopes", "bogus"], "scopes must be a comma-separated subset")):
        result = run_cli(settings, *args)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr
    result = run_cli(settings, "jobs", "cancel", "999")
    assert result.returncode == 1 and "999" in result.stderr and "Traceback" not in result.stderr
    assert run_cli(settings, "jobs", "submit", "rebuild_index").returncode == 0
    shown = json.loads(run_cli(settings, "jobs", "show", "1").stdout)
    assert shown["created_at"].endswith("Z") and "T" in shown["created_at"]  # as the API writes it
    result = run_cli(settings, "index", "verify", port="abc")
    assert result.returncode == 2 and "invalid setting: RETRIEVAL_PORT='abc'" in result.stderr


def test_photos_straight_off_a_phone(tmp_path: Path, tiny_embedder: Path) -> None:
    """A camera roll copied off a phone: HEIC under upper-case names, an AVIF, a JPEG. The build reads them all,
    a HEIC query finds its own photo first, an uploaded HEIC is stored as one and its thumbnail is a JPEG."""
    from app.indexing import build_index
    from tests.test_api_helpers import app_client, upload
    from tests.test_images import heic_bytes

    roll = tmp_path / "DCIM" / "100APPLE"
    roll.mkdir(parents=True)
    photos = {name: class_image(colour, seed=seed, size=64) for name, colour, seed in (
        ("IMG_0001.HEIC", "red", 1), ("IMG_0002.HEIC", "blue", 2), ("IMG_0003.avif", "green", 3),
        ("IMG_0004.JPG", "yellow", 4))}
    for name, photo in photos.items():
        if name.endswith(".HEIC"):
            (roll / name).write_bytes(heic_bytes(photo, orientation=1))
        else:
            photo.save(roll / name, quality=90)
    settings = make_settings(tmp_path / "data", migrated_url("sqlite", None, tmp_path),
                             embedder=str(tiny_embedder))
    report = build_index(settings, tmp_path / "DCIM", progress=False)
    assert (report.added, report.failed, report.total_indexed) == (4, [], 4), report.summary()
    rows = live_rows(settings)
    assert sorted(Path(uri).name for uri in rows) == sorted(photos)

    with app_client(settings) as client:
        found = upload(client, heic_bytes(photos["IMG_0002.HEIC"]), filename="IMG_0002.HEIC", k=4)
        assert found.status_code == 200, found.text
        assert Path(found.json()["results"][0]["uri"]).name == "IMG_0002.HEIC"
        added = upload(client, heic_bytes(class_image("red", seed=99, size=64)), path="/v1/images",
                       filename="IMG_0005.HEIC")
        assert added.status_code == 201, added.text
        assert added.json()["uri"].endswith(".heic")
        thumbnail = client.get(f"/v1/images/{added.json()['id']}/thumbnail")
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        assert PILImage.open(io.BytesIO(thumbnail.content)).format == "JPEG"
