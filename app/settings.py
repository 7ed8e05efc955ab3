"""The one settings object. Every knob is an environment variable named RETRIEVAL_<FIELD>."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Root for models/, indexes/, images/ and the SQLite file.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default is SQLite at <data_dir>/retrieval.db. `postgresql://` and "
                          "`postgres://` mean `postgresql+psycopg2://` (the driver installed); an explicit "
                          "`+driver` is kept."
    )
    device: str = Field("auto", description="'auto' picks CUDA when present, else 'cpu'; or 'cpu', 'cuda', 'cuda:N' "
                                            "(a GPU that is not there stops a build, and a service's load, with a "
                                            "message saying so).")
    embedder: str = Field(
        "efficientnet_lite012_gem",
        description=(
            "Embedder used when no model version is active: a checkpoint dir or a built-in name "
            "(efficientnet_lite012_gem: the three EfficientNet-Lite trunks, GeM, 3840-d, the default since it serves "
            "~70 q/s on 2 cores, 4x what Lite0 served before the fast runtime, and retrieves better, docs/quality.md; "
            "efficientnet_lite0: one trunk, "
            "1280-d, ~2.5x faster to embed and a third of the index memory; efficientnet_lite0_gem; "
            "efficientnet_lite01_gem)."
        ),
    )
    runtime: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description=(
            "Inference runtime: 'auto' is OpenVINO on CPU (then ONNX Runtime, then torch) and torch with autocast "
            "on CUDA; a runtime that is missing or fails its parity check falls back to the next, torch last."
        ),
    )
    inference_precision: Literal["auto", "fp32", "reduced"] = Field(
        "auto", description="'reduced': bf16 (fp16 where bf16 is missing) if it passes the parity check, else fp32; "
                            "'auto': 'reduced' on CUDA, 'fp32' on CPU (CPU bf16 misses the parity floor on real "
                            "photos); 'fp32' forces fp32."
    )
    inference_threads: int = Field(
        0, ge=0, description="Threads the inference runtime (and torch, when set) may use. 0: all cores, except in "
                             "an API process serving with OpenVINO whose forward pass takes under 5 ms per image: one "
                             "thread less, for request handling (API workers > 1: each its share of the cores).")
    demo_source: Path | None = Field(
        None, description="Folder or CSV manifest `retrieval demo` indexes instead of exporting Fashion-MNIST."
    )
    host: str = Field("127.0.0.1", description="Address `retrieval serve` binds to.")
    port: int = Field(8000, description="Port `retrieval serve` listens on.")
    api_workers: int = Field(
        1, ge=1, description="Worker processes `retrieval serve` runs (uvicorn --workers). More run more event loops "
                             "for the Python half of a query, for hosts with cores to spare (on 2 cores: 207 against "
                             "200 q/s, docs/benchmarks.md); each holds its own model and index, and sees the others' "
                             "adds and deletes within RETRIEVAL_SWAP_POLL_S.")

    # Limits on what a client may send.
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="Largest accepted upload, checked while streaming.")
    max_image_pixels: int = Field(40_000_000, description="Largest width*height decoded (pixel-bomb guard).")
    max_k: int = Field(100, description="Largest k a search may ask for.")
    near_duplicate_threshold: float = Field(
        0.88, ge=-1.0, le=1.0,
        description="Cosine at or above which two images are near-duplicates (GET /v1/duplicates, "
                    "on_near_duplicate=reject); measured in docs/api.md.")

    # Batch job.
    batch_size: int = Field(32, description="Images per forward pass in the index build.")
    num_workers: int = Field(2, description=(
        "Decode workers for the index build: on CPU, threads (at least one per core) that decode each batch before "
        "its forward pass; on a GPU, DataLoader processes (at least one per core but one) that decode ahead of it. "
        "0: the calling thread."))

    # Micro-batching of concurrent queries onto the device.
    max_batch_size: int = Field(
        0, ge=0, description="Most concurrent queries coalesced into one forward pass. 0: 4 on CPU (the serving "
                             "runtime's img/s is flat or falling past 4), 32 on CUDA.")
    max_batch_wait_ms: float = Field(
        0.0, description="How long a query waits for others to join its batch (0: none; queries that arrive while a "
                         "forward pass runs still share the next one)."
    )
    max_queue: int = Field(256, description="Queued queries beyond which the service answers 503.")
    retry_after_s: int = Field(1, description="Retry-After seconds sent with a 503 when the queue is full.")
    explain_max_concurrent: int = Field(
        1, description="Requests computing explain heatmaps at once (each is several torch forward passes)."
    )
    explain_max_queue: int = Field(
        4, description="Explain requests waiting beyond the running ones, past which the service answers 503."
    )

    # Hot swap: how often the service polls SQL for a newly promoted model + index version.
    swap_poll_s: float = Field(5.0, description="Seconds between checks for a new active index version.")
    malloc_trim_s: float = Field(
        60.0, ge=0, description="Seconds between handing the memory glibc malloc holds free back to the OS "
                                "(malloc_trim; keeps RSS from creeping under load, docs/reliability.md; 0: never)."
    )
    catchup_max_embed: int = Field(
        1000, description="At load, live images with no stored embedding are embedded when at most this many."
    )
    compact_every: int = Field(
        1000, description="Online adds+deletes after which the service publishes a compacted index version (0: never)."
    )
    compact_after_s: float = Field(
        600.0, description="Seconds after the first online change not yet compacted at which the service compacts "
                           "anyway (0: never)."
    )
    thumbnail_size: int = Field(256, description="Longest side of thumbnails served by /v1/images/{id}/thumbnail.")

    # Versions kept on disk after publishing a new one.
    keep_versions: int = Field(3, description="Index versions kept on disk after publishing a new one.")

    # Index type and build tuning (app/indexing/).
    index_memory_mb: int = Field(4096, description="Memory budget that picks the index type (Flat/HNSW/IVF/PQ).")
    index_recall_target: float = Field(0.95, description="recall@10 vs exact search that nprobe/efSearch are "
                                                         "tuned to at build time.")
    embed_flush_every: int = Field(2048, description="Images per embedding shard: bounds work lost to a crash.")
    ray_address: str | None = Field(
        None, description="Ray cluster `retrieval index build --ray` joins when --ray names none ('auto': the "
                          "running one; unset: start a local one).")
    ray_embed_actors: int = Field(
        0, description="Embedding actors of a Ray build (0: one per GPU, or half the CPUs on a CPU-only cluster).")

    # Training worker (`retrieval worker`): how often it heartbeats and polls, and when a silent job is stale.
    worker_heartbeat_s: float = Field(5.0, description="Seconds between a running job's heartbeats.")
    worker_stale_after_s: float = Field(
        60.0, description="A running job with no heartbeat for this long is re-queued (or failed past max_attempts)."
    )
    worker_poll_s: float = Field(2.0, description="Seconds an idle worker waits before looking for a job again.")
    job_max_attempts: int = Field(3, description="Runs a job gets (a dead worker's run counts) before it fails.")

    # Auth: reads may be left open; writes need an API key with the 'write' scope.
    auth_enabled: bool = Field(False, description="Require API keys (X-API-Key header) for writes.")
    open_reads: bool = Field(True, description="With auth on, let reads (search, get) through without a key.")
    auth_cache_s: float = Field(5.0, description="Seconds a looked-up API key is cached (revocation delay).")

    @field_validator("database_url")
    @classmethod
    def _installed_driver(cls, value: str | None) -> str | None:
        return normalize_database_url(value) if value else value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'retrieval.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.data_dir / "indexes"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    def embeddings_dir(self, model_name: str) -> Path:
        """Stored embeddings of one model: written by the batch job and by the API, read by both."""
        return self.data_dir / "embeddings" / model_name

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"


# A PostgreSQL URL without a driver: SQLAlchemy 2.1 picks psycopg (3) for `postgresql://`, which is not installed,
# and no longer knows `postgres://` (Heroku's and many hosts' spelling); psycopg2 is the driver this service ships.
POSTGRES_SCHEMES = ("postgresql", "postgres")
POSTGRES_DRIVER = "postgresql+psycopg2"


def normalize_database_url(url: str) -> str:
    """`postgresql://...` and `postgres://...` as `postgresql+psycopg2://...` (the rest kept byte for byte); any
    other URL, an explicit driver included (`postgresql+psycopg://`), as written."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.strip().lower() in POSTGRES_SCHEMES:
        return f"{POSTGRES_DRIVER}://{rest}"
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_table() -> str:
    """The README's configuration table, generated from the fields above (`python -m app.settings`)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "SQLite at `<data_dir>/retrieval.db`" if name == "database_url" else f"`{field.default}`"
        rows.append(f"| `RETRIEVAL_{name.upper()}` | {default} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
