"""The batch index-building job: folder and CSV sources, idempotent re-runs, bad files, the default embedder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from tests.conftest import CLASS_COLOURS, class_image, make_settings, migrated_url


def make_corpus(root: Path, per_class: int = 6, size: int = 64) -> Path:
    for label in CLASS_COLOURS:
        (root / label).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            class_image(label, seed=1000 * list(CLASS_COLOURS).index(label) + n, size=size).save(
                root / label / f"{n}.jpg", quality=90)
    return root


def plant_bad_files(root: Path) -> tuple[Path, Path]:
    text = root / "red" / "notes.jpg"
    text.write_text("this is text, not a JPEG")
    good = (root / "green" / "0.jpg").read_bytes()
    truncated = root / "truncated.jpg"  # root-level: no label
    truncated.write_bytes(good[: len(good) // 2])
    return text, truncated


def test_folder_build_is_idempotent_and_reports_bad_files(database_url: str, tmp_path: Path,
                                                          tiny_embedder: Path) -> None:
    from app.db.models import Image, IndexVersion
    from app.db.session import session_scope
    from app.indexing import build_index, verify_index
    from index.vector_index import VectorIndex

    corpus = make_corpus(tmp_path / "corpus")
    text, truncated = plant_bad_files(corpus)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))

    first = build_index(settings, corpus, progress=False)
    assert first.embedded == 24 and first.total_indexed == 24
    assert first.index_version_name is not None
    failed = dict(first.failed)
    assert set(failed) == {str(text), str(truncated)}
    assert "not an image" in failed[str(text)] and "truncated" in failed[str(truncated)]

    second = build_index(settings, corpus, progress=False)
    assert second.added == 0 and second.embedded == 0
    assert second.index_version_name is None and "nothing to publish" in second.message
    assert set(dict(second.failed)) == {str(text), str(truncated)}  # still reported, not retried

    with session_scope(settings.resolved_database_url) as session:
        live = session.scalars(select(Image).where(Image.deleted_at.is_(None))).all()
        assert len(live) == 24
        assert {im.label for im in live} == set(CLASS_COLOURS)
        assert all(Path(im.uri).is_absolute() and im.width == 64 for im in live)
        versions = session.scalars(select(IndexVersion)).all()
        assert [v.status for v in versions] == ["active"]
        index = VectorIndex.load(versions[0].path)
        assert sorted(index.ids().tolist()) == sorted(im.id for im in live)
    assert verify_index(settings).ok


def test_decode_threads_embed_exactly_as_the_calling_thread(tmp_path: Path, tiny_embedder: Path,
                                                           request: pytest.FixtureRequest) -> None:
    """On CPU a build decodes each batch on a thread per core, then embeds it; the vectors and the reported bad
    files are the same as decoding on one thread, with batches that straddle the bad files."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index
    from app.registry import active_model
    from index import versions

    corpus = make_corpus(tmp_path / "corpus", per_class=4)
    text, truncated = plant_bad_files(corpus)
    stored = {}
    for workers in (0, 3):
        (tmp_path / f"db{workers}").mkdir()
        url = migrated_url("sqlite", request, tmp_path / f"db{workers}")
        settings = make_settings(tmp_path / f"data{workers}", url, embedder=str(tiny_embedder), batch_size=5,
                                 num_workers=workers, device="cpu")
        report = build_index(settings, corpus, progress=False)
        assert report.embedded == 16 and set(dict(report.failed)) == {str(text), str(truncated)}
        with session_scope(url) as session:
            uris = dict(session.execute(select(Image.id, Image.uri)).tuples().all())
            ids, vectors = versions.load_embeddings(settings.embeddings_dir(active_model(session).name))
        stored[workers] = {uris[int(i)]: v for i, v in zip(ids, vectors, strict=True)}
    assert stored[0].keys() == stored[3].keys() and len(stored[0]) == 16
    for uri, vector in stored[0].items():
        np.testing.assert_array_equal(vector, stored[3][uri], err_msg=uri)


def test_csv_manifest_with_metadata(database_url: str, tmp_path: Path, tiny_embedder: Path) -> None:
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index

    corpus = make_corpus(tmp_path / "corpus", per_class=2)
    manifest = corpus / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "photographer", "year"])
        for n, label in enumerate(CLASS_COLOURS):
            writer.writerow([f"{label}/0.jpg", label, f"ph{n}", str(2000 + n)])
            writer.writerow([str((corpus / label / "1.jpg").resolve()), "", "", ""])  # absolute, no label
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    report = build_index(settings, manifest, progress=False)
    assert report.added == 8 and report.total_indexed == 8 and not report.failed
    with session_scope(database_url) as session:
        rows = {Path(im.uri).relative_to(corpus.resolve()).as_posix(): im for im in session.scalars(select(Image))}
    assert rows["red/0.jpg"].label == "red" and rows["red/0.jpg"].meta == {"photographer": "ph0", "year": "2000"}
    assert rows["blue/1.jpg"].label is None and rows["blue/1.jpg"].meta == {}


def test_incremental_build_reuses_stored_embeddings(database_url: str, tmp_path: Path,
                                                    tiny_embedder: Path) -> None:
    from app.indexing import build_index

    corpus = make_corpus(tmp_path / "corpus", per_class=3)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    assert build_index(settings, corpus, progress=False).embedded == 12
    class_image("red", seed=99, size=64).save(corpus / "red" / "new.jpg")
    report = build_index(settings, corpus, progress=False)
    assert (report.added, report.embedded, report.total_indexed) == (1, 1, 13)
    assert report.index_version_name is not None


def test_default_embedder_build(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The real default embedder (EfficientNet-Lite0 with shipped weights): same-class images are neighbours.
    What the model embeds does not depend on the database: SQLite (the other builds here run on both)."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.indexing import build_index
    from app.registry import active_model
    from index import versions
    from index.vector_index import VectorIndex

    database_url = migrated_url("sqlite", request, tmp_path)
    corpus = make_corpus(tmp_path / "corpus", per_class=3, size=96)
    settings = make_settings(tmp_path / "data", database_url)  # embedder = "efficientnet_lite0"
    report = build_index(settings, corpus, progress=False)
    assert report.total_indexed == 12 and report.index_version_name
    with session_scope(database_url) as session:
        model = active_model(session)
        assert model is not None and model.dim == 1280
        labels = dict(session.execute(select(Image.id, Image.label)).tuples().all())
        store = settings.embeddings_dir(model.name)
        path = session.scalars(select(Image.uri)).first()
    assert path is not None
    ids, vectors = versions.load_embeddings(store)
    assert vectors.shape == (12, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    index = VectorIndex.load(settings.indexes_dir / report.index_version_name)
    _, found = index.search(vectors, 2)
    same = [labels[int(i)] == labels[int(row[1])] for i, row in zip(ids, found, strict=True)]
    assert np.mean(same) >= 0.9


def test_service_load_embeds_live_images_the_index_lacks(database_url: str, tmp_path: Path,
                                                         tiny_embedder: Path) -> None:
    """Rows registered after the build (say, a build killed before embedding) are embedded when the service
    loads, through the same path as a build: the good file becomes searchable, the text file named .jpg is
    marked deleted with its reason, and nothing else changes."""
    from app.db.models import Image
    from app.db.session import session_scope
    from app.deployment import load_active
    from app.indexing import build_index
    from index import versions

    corpus = make_corpus(tmp_path / "corpus", per_class=3)
    settings = make_settings(tmp_path / "data", database_url, embedder=str(tiny_embedder))
    build_index(settings, corpus, progress=False)
    late = tmp_path / "late.jpg"
    class_image("blue", seed=4242, size=64).save(late, quality=90)
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image at all")
    with session_scope(database_url) as session:
        rows = [Image(sha256=f"{n}" * 64, uri=str(path), width=64, height=64, meta={}) for n, path in
                ((1, late), (2, fake))]
        session.add_all(rows)
        session.flush()
        late_id, fake_id = (row.id for row in rows)

    deployment = load_active(settings)
    assert deployment is not None and len(deployment.index) == 13  # 12 built + the late one
    assert torch.is_grad_enabled()  # loading leaves the caller's autograd alone (it once switched it off)
    stored_ids, stored = versions.load_embeddings(deployment.store, keep=np.array([late_id]))
    assert stored_ids.tolist() == [late_id]  # kept as a shard: a restart restores it without re-embedding
    scores, found = deployment.search(stored, 13)
    assert scores[0][found[0] == late_id] == pytest.approx(1.0, abs=2e-3)  # it is in the served index
    direct = deployment.embed([PILImage.open(late).convert("RGB")])
    np.testing.assert_allclose(direct, stored, atol=2e-3)  # the model's own embedding (shards hold float16)
    with session_scope(database_url) as session:
        bad = session.get(Image, fake_id)
        assert bad.deleted_at is not None and "decode_error" in bad.meta
