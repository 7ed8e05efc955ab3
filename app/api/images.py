"""Stored images: add (durable and searchable before the 201), get, list, update metadata, delete, thumbnail."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path as FsPath
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from fastapi.responses import FileResponse
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.api.content_type import json_body, multipart_body
from app.api.deps import (
    SessionDep,
    filters_dep,
    form_fields_in_the_body,
    get_batcher,
    get_deployment,
    not_ready,
)
from app.auth import require_read, require_write
from app.db.models import Image
from app.deployment import Deployment, ServingState, write_api_embedding
from app.duplicates import near_duplicate_of
from app.errors import ApiError
from app.images import FORMATS_READ, read_image_file
from app.schemas import ErrorBody, ImageOut, ImagePage, ImageUpdate, no_label_if_empty
from app.serving import Filters, StageClock, check_metadata, decode_query, embed_pixels
from app.settings import Settings

router = APIRouter(prefix="/v1/images", tags=["images"])

IMAGE_ID = Path(ge=1, le=2**62, description="The image id (also its vector id in the index).")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg",
              "AVIF": "avif", "HEIF": "heic"}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (401, 403, 422, *codes)}


def _live_row(session: Session, image_id: int) -> Image:
    row = session.get(Image, image_id)
    if row is None or row.deleted_at is not None:
        raise ApiError(404, f"image {image_id} does not exist")
    return row


# -- read -------------------------------------------------------------------------------------------------

@router.get("", response_model=ImagePage, responses=_errors(), dependencies=[Depends(require_read)])
def list_images(
    session: SessionDep,
    limit: int = Query(50, ge=1, le=500, description="Page size."),
    cursor: int | None = Query(None, ge=0, le=2**62, description="`next_cursor` of the previous page."),
    filters: Filters = Depends(filters_dep),
) -> ImagePage:
    """Live images in id order, with keyset paging (stable under concurrent inserts and deletes)."""
    total = session.scalar(filters.apply(select(func.count(Image.id))))
    query = filters.apply(select(Image))
    if cursor is not None:
        query = query.where(Image.id > cursor)
    rows = session.scalars(query.order_by(Image.id).limit(limit + 1)).all()
    items = [ImageOut.model_validate(r) for r in rows[:limit]]
    next_cursor = items[-1].id if len(rows) > limit else None
    return ImagePage(items=items, total=int(total or 0), next_cursor=next_cursor)


@router.get("/{image_id}", response_model=ImageOut, responses=_errors(404), dependencies=[Depends(require_read)])
def get_image(session: SessionDep, image_id: int = IMAGE_ID) -> ImageOut:
    return ImageOut.model_validate(_live_row(session, image_id))


def _thumbnail_path(settings: Settings, sha256: str, size: int) -> FsPath:
    return settings.data_dir / "thumbnails" / sha256[:2] / f"{sha256}-{size}.jpg"


def _make_thumbnail(settings: Settings, uri: str, target: FsPath, size: int) -> None:
    image = read_image_file(uri, settings.max_upload_bytes, settings.max_image_pixels, min_side=size)
    image.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".thumb.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, "JPEG", quality=85)
        os.replace(tmp, target)  # a concurrent request reads either no file or a whole one
    except BaseException:
        FsPath(tmp).unlink(missing_ok=True)
        raise


@router.get("/{image_id}/thumbnail", response_class=FileResponse, dependencies=[Depends(require_read)],
            responses={200: {"content": {"image/jpeg": {}}, "description": "A JPEG thumbnail."},
                       **_errors(404)})
async def thumbnail(request: Request, session: SessionDep, image_id: int = IMAGE_ID) -> FileResponse:
    """A JPEG whose longest side is at most `thumbnail_size`; generated once, then served from disk."""
    settings: Settings = request.app.state.settings

    def row_info() -> tuple[str, str]:
        row = _live_row(session, image_id)
        session.commit()  # hands the connection back while the thumbnail is made
        return row.sha256, row.uri

    sha256, uri = await run_in_threadpool(row_info)
    size = settings.thumbnail_size
    path = _thumbnail_path(settings, sha256, size)
    if not path.exists():
        try:
            await run_in_threadpool(_make_thumbnail, settings, uri, path, size)
        except OSError:
            raise ApiError(404, f"the file of image {image_id} is gone") from None
    # The content of an id never changes (sha256-named), so clients may cache it for a day.
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400",
                                                                "ETag": f'"{sha256[:32]}-{size}"'})


# -- write ------------------------------------------------------------------------------------------------

def _store_bytes(settings: Settings, data: bytes, sha256: str, fmt: str | None) -> FsPath:
    """Write the upload under a name derived from its content (never the client's), fsynced, atomically."""
    ext = EXTENSIONS.get(fmt or "", "img")
    target = settings.images_dir / sha256[:2] / f"{sha256}.{ext}"
    if target.exists():
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        FsPath(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target.resolve()


def _sniff_format(data: bytes) -> str | None:
    try:
        with PILImage.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # decode_image already accepted the bytes; the extension is cosmetic
        return None


def _parse_metadata(text: str | None) -> dict[str, Any]:
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"metadata must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(422, "metadata must be a JSON object, e.g. {\"color\": \"red\"}")
    if len(text) > 64 * 1024:
        raise ApiError(422, "metadata is over 64 KiB")
    check_metadata(value)
    return value


def _commit_new_image(request: Request, session: Session, started_on: Deployment, image: PILImage.Image,
                      vector: np.ndarray, data: bytes, sha256: str, label: str | None,
                      meta: dict[str, Any], reject_above: float | None = None) -> ImageOut:
    """Insert (or revive) the row, persist its embedding, add it to the live index: all before the 201.

    Runs under the write lock that a hot swap also takes, so the vector lands in whichever index serves next,
    and so two near-identical uploads at once cannot both pass the near-duplicate check (`reject_above`).
    """
    settings: Settings = request.app.state.settings
    state: ServingState = request.app.state.serving
    with state.write_lock:
        deployment: Deployment | None = request.app.state.deployment
        if deployment is None:
            raise not_ready(request)
        if deployment is not started_on:  # swapped while we embedded: embed with the new model instead
            vector = deployment.forward_batch(deployment.preprocess(image)[None])[0]
        row = session.scalar(select(Image).where(Image.sha256 == sha256))
        if row is not None and row.deleted_at is None:
            raise ApiError(409, f"this image is already stored as image {row.id}", code="duplicate",
                           detail={"id": row.id})
        if reject_above is not None:
            match = near_duplicate_of(deployment, vector, reject_above)
            if match is not None:
                raise ApiError(409, f"this image is a near-duplicate of image {match[0]} (score {match[1]:.3f} >= "
                                    f"{reject_above})", code="near_duplicate",
                               detail={"id": match[0], "score": round(match[1], 4)})
        path = _store_bytes(settings, data, sha256, _sniff_format(data))
        if row is None:
            width, height = image.info.get("full_size", image.size)  # the photo's size, not the decoded draft's
            row = Image(sha256=sha256, uri=str(path), width=width, height=height)
            session.add(row)
        row.label, row.meta, row.deleted_at, row.uri = label, meta, None, str(path)
        session.flush()
        # The embedding is on disk before the row commits: a crash in between leaves an orphan vector for
        # an id SQL never saw, which reconcile ignores (it only re-adds live SQL ids).
        write_api_embedding(deployment.store, row.id, vector)
        out = ImageOut.model_validate(row)
        session.commit()  # under the write lock: a hot swap's reconcile sees this row
        deployment.add(np.array([out.id], dtype=np.int64), vector[None, :])
        state.note_changes(1)
    return out


@router.post("", response_model=ImageOut, status_code=201,
             dependencies=[Depends(require_write), Depends(multipart_body("-F file=@photo.jpg -F label=sneaker")),
                           Depends(form_fields_in_the_body)],
             responses=_errors(400, 409, 413, 415, 503))
async def add_image(
    request: Request,
    response: Response,
    session: SessionDep,
    file: UploadFile = File(..., description=f"The image ({FORMATS_READ})."),
    label: str | None = Form(None, max_length=255, description="A class label, e.g. 'sneaker'; empty is no label."),
    metadata: str | None = Form(None, description='A JSON object, e.g. {"color": "red", "year": 2021}.'),
    on_near_duplicate: Literal["allow", "reject"] = Form(
        "allow", description="`reject`: answer 409 (`near_duplicate`, `detail.id`, `detail.score`) when a stored "
                             "image scores at or above `near_duplicate_threshold` with this one."),
    near_duplicate_threshold: float | None = Form(
        None, ge=-1.0, le=1.0, description="Cosine for `reject` (-1..1); default RETRIEVAL_NEAR_DUPLICATE_THRESHOLD."),
) -> ImageOut:
    """Store an image: it is on disk, in SQL, embedded and searchable, durably, when the 201 returns.

    Uploading bytes that are already stored answers 409 with the existing id in `detail.id`; with
    `on_near_duplicate=reject`, so does an upload that is a near-duplicate of a stored image.
    """
    settings: Settings = request.app.state.settings
    deployment = get_deployment(request)
    meta = _parse_metadata(metadata)
    data = await file.read()
    clock = StageClock()
    image, pixels = await run_in_threadpool(decode_query, deployment, data, settings, clock)
    sha256 = hashlib.sha256(data).hexdigest()
    vector = await embed_pixels(get_batcher(request), deployment, pixels, clock)
    reject_above = None
    if on_near_duplicate == "reject":
        reject_above = near_duplicate_threshold if near_duplicate_threshold is not None else \
            settings.near_duplicate_threshold
    out = await run_in_threadpool(_commit_new_image, request, session, deployment, image, vector, data, sha256,
                                  no_label_if_empty(label), meta, reject_above)
    metrics.IMAGES_WRITTEN.labels("added").inc()
    response.headers["Location"] = f"/v1/images/{out.id}"
    return out


@router.patch("/{image_id}", response_model=ImageOut,
              dependencies=[Depends(require_write), Depends(json_body('{"label": "sneaker"}'))],
              responses=_errors(404, 415))
def update_image(session: SessionDep, patch: ImageUpdate, image_id: int = IMAGE_ID) -> ImageOut:
    """Update the label and/or metadata (a merge patch: a metadata key set to null is removed; a label set to null
    or "" is cleared). The body is JSON (Content-Type: application/json)."""
    row = _live_row(session, image_id)
    if "label" in patch.model_fields_set:
        row.label = patch.label
    if patch.metadata is not None:
        # Only keys being set: a null removes a key, even one no filter can address.
        check_metadata({key: value for key, value in patch.metadata.items() if value is not None})
        merged = dict(row.meta or {})
        for key, value in patch.metadata.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        row.meta = merged
    session.flush()
    out = ImageOut.model_validate(row)
    session.commit()
    metrics.IMAGES_WRITTEN.labels("updated").inc()
    return out


@router.delete("/{image_id}", status_code=204, response_class=Response, dependencies=[Depends(require_write)],
               responses=_errors(404))
def delete_image(request: Request, session: SessionDep, image_id: int = IMAGE_ID) -> Response:
    """Delete an image: it is gone from every result once this returns (soft delete in SQL + index removal)."""
    state: ServingState = request.app.state.serving
    with state.write_lock:
        _live_row(session, image_id).deleted_at = datetime.now(UTC)
        session.commit()  # under the write lock: a hot swap's reconcile sees the delete
        deployment: Deployment | None = request.app.state.deployment
        if deployment is not None:
            deployment.remove(np.array([image_id], dtype=np.int64))
        state.note_changes(1)
    metrics.IMAGES_WRITTEN.labels("deleted").inc()
    return Response(status_code=204)
