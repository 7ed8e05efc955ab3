"""Request and response models of the REST API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    computed_field,
    field_validator,
)


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was stored as UTC; PostgreSQL hands back aware ones in the
    # session's TimeZone (+02:00 on a server set to Europe/Berlin). Both become UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_timestamp(value: datetime) -> str:
    """The one form every timestamp in a response takes: RFC 3339 in UTC, always with microseconds and `Z`
    (`2024-05-01T12:00:00.000000Z`), so the time a write returns reads back as the same string."""
    return _as_utc(value).isoformat(timespec="microseconds").replace("+00:00", "Z")


# Every datetime field of a response model: what SQL hands back, whichever database, written as utc_timestamp().
UtcDatetime = Annotated[
    datetime,
    AfterValidator(_as_utc),
    PlainSerializer(utc_timestamp, return_type=str, when_used="json"),
    # The serializer would otherwise make the OpenAPI response schema a bare string.
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


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
    created_at: UtcDatetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def thumbnail_url(self) -> str:
        return f"/v1/images/{self.id}/thumbnail"


class ImagePage(BaseModel):
    items: list[ImageOut]
    total: int = Field(description="Live images matching the filters.")
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


def no_label_if_empty(label: str | None) -> str | None:
    """The one rule for an empty label: it is no label (no filter in a query, null when written)."""
    return label if label else None


class ImageUpdate(BaseModel):
    """A merge patch: `label` replaces the label (null or "" clears it: an empty label is no label, as
    everywhere in the API); in `metadata` a key set to null is removed, any other value is set, and keys not named
    are kept."""

    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, max_length=255, description='The new label; null or "" clears it.')
    metadata: dict[str, Any] | None = None

    _empty_label_is_none = field_validator("label")(no_label_if_empty)


class SearchHit(BaseModel):
    id: int
    score: float
    uri: str
    label: str | None
    metadata: dict[str, Any]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def thumbnail_url(self) -> str:
        return f"/v1/images/{self.id}/thumbnail"


class Timings(BaseModel):
    decode_ms: float
    embed_ms: float = Field(description="preprocess + queue wait + forward pass")
    search_ms: float
    metadata_ms: float
    total_ms: float
    preprocess_ms: float = 0.0
    forward_ms: float = Field(0.0, description="queue wait + the (batched) forward pass")


Grid = list[list[float]]


class ImageExplanation(BaseModel):
    """One image of an explained pair. `crop`: [x0, y0, x1, y1], fractions of the image, of the model's input
    crop, which the maps cover; `heatmap`: [h][w] cosines in [-1, 1] between each location's feature and the other
    image's embedding (row 0 at the top); `masks`: ABE's attention masks / OSME's part maps, [M][h'][w'] in [0, 1],
    null for other archs."""

    id: int | None = None
    crop: list[float]
    heatmap: Grid | None = None
    masks: list[Grid] | None = None


class ResultExplanation(BaseModel):
    id: int
    score: float  # cosine of the two embeddings, as the torch model computes it
    query_heatmap: Grid  # the query's locations against this result's embedding, [h][w]
    result: ImageExplanation  # this result's locations against the query's embedding


class SearchExplanation(BaseModel):
    """`explain=true` on a search: heatmaps for the query against each result shown."""

    grid: list[int]  # [h, w] of every heatmap
    mask_grid: list[int] | None  # [h', w'] of the masks
    query: ImageExplanation  # the query's crop and masks (its heatmaps are per result)
    results: list[ResultExplanation]
    unexplained: list[int]  # result ids whose file could not be read
    explain_ms: float  # the results' forward pass and the maps (the query's pass is the search's own)


class ExplainResponse(BaseModel):
    model_version: str
    grid: list[int]
    mask_grid: list[int] | None
    score: float
    query: ImageExplanation
    result: ImageExplanation
    explain_ms: float


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model_version: str
    index_version: str
    timings: Timings
    next_offset: int | None = Field(None, description="Pass as `offset` (same k and options) for the next page; "
                                                      "null when this page is short or RETRIEVAL_MAX_K is reached.")
    explain: SearchExplanation | None = None  # only with explain=true


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    arch: str
    dim: int
    status: str
    metrics: dict[str, Any]
    created_at: UtcDatetime
    activated_at: UtcDatetime | None
    serving: dict[str, Any] | None = Field(
        None, description="For the model this process serves: its inference runtime, precision, device and the "
                          "parity check's worst cosine to torch fp32 (models/runtime.py); null for the others.")


class IndexVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    model_version_id: int
    factory: str
    ntotal: int
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    created_at: UtcDatetime
    activated_at: UtcDatetime | None


class ModelVersionList(BaseModel):
    items: list[ModelVersionOut]


class IndexVersionList(BaseModel):
    items: list[IndexVersionOut]


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)


class DuplicatePair(BaseModel):
    a: int
    b: int
    score: float = Field(description="Cosine similarity of the two images' embeddings.")


class DuplicateGroup(BaseModel):
    keeper_id: int = Field(description="The suggested image to keep: largest resolution, then oldest.")
    images: list[ImageOut] = Field(description="The group, the keeper first, then by id.")
    pairs: list[DuplicatePair] = Field(description="Every pair in the group with its score, best first.")


class DuplicatePage(BaseModel):
    groups: list[DuplicateGroup]
    threshold: float
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page; null on the last page.")
