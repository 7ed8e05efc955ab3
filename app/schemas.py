"""Request and response models of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    error: str = Field(description="A short machine-readable code, e.g. 'invalid_image'.")
    message: str = Field(description="What was wrong, for a person.")
    detail: Any | None = None


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    sha256: str
    uri: str
    label: str | None
    width: int
    height: int
    metadata: dict[str, Any] = Field(validation_alias="meta")
    created_at: datetime


class SearchHit(BaseModel):
    id: int
    score: float
    uri: str
    label: str | None
    metadata: dict[str, Any]


class Timings(BaseModel):
    decode_ms: float
    embed_ms: float
    search_ms: float
    metadata_ms: float
    total_ms: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model_version: str
    index_version: str
    timings: Timings


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)
