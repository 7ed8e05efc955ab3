"""Stored images."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from app.db.models import Image
from app.db.session import session_scope
from app.errors import ApiError
from app.schemas import ErrorBody, ImageOut

router = APIRouter(prefix="/v1/images", tags=["images"])


@router.get("/{image_id}", response_model=ImageOut, responses={404: {"model": ErrorBody}})
def get_image(request: Request, image_id: int = Path(ge=1, le=2**62)) -> ImageOut:
    with session_scope(request.app.state.settings.resolved_database_url) as session:
        row = session.get(Image, image_id)
        if row is None or row.deleted_at is not None:
            raise ApiError(404, f"image {image_id} does not exist")
        return ImageOut.model_validate(row)
