"""The index jobs: rebuild_index and reembed, and the embed + publish step a promoted training job ends with."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.db.models import ModelVersion
from app.db.session import session_scope
from app.indexing import BuildReport, embed_missing, publish_index
from app.registry import (
    active_index,
    ensure_active_model,
    is_embedder_spec,
    register_embedder,
    unknown_model_message,
)
from app.settings import Settings
from app.worker.context import JobContext


def model_row(settings: Settings, name: str) -> ModelVersion | None:
    with session_scope(settings.resolved_database_url) as session:
        model = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if model is not None:
            session.expunge(model)
        return model


def active_index_name(settings: Settings) -> str | None:
    with session_scope(settings.resolved_database_url) as session:
        row = active_index(session)
        return row.name if row is not None else None


def publish_for_model(ctx: JobContext, model: ModelVersion, start: float, end: float,
                      factory: str | None = None, force: bool = True) -> dict[str, Any]:
    """Embed every live image missing an embedding for `model`, build an index, promote the pair (one transaction)."""
    report = BuildReport()
    ctx.progress(start, f"embedding the corpus with {model.name}")
    embed_missing(ctx.settings, model, None, report, progress=False, stem_prefix=f"job{ctx.job_id}")
    ctx.check()
    ctx.progress(start + (end - start) * 0.7, f"building the index for {model.name}", embedded=report.embedded)
    publish_index(ctx.settings, model, report, factory=factory, force=force)
    ctx.progress(end, report.message or f"published {report.index_version_name}")
    return {"embedded": report.embedded, "index_version": report.index_version_name,
            "indexed": report.total_indexed, "factory": report.factory}


def run_rebuild_index(ctx: JobContext) -> dict[str, Any]:
    """Re-type or compact the active model's index from stored embeddings, and promote it."""
    return publish_for_model(ctx, ensure_active_model(ctx.settings), 0.05, 1.0, factory=ctx.params.get("factory"))


def run_reembed(ctx: JobContext) -> dict[str, Any]:
    """Embed the corpus with a model version (`model_version`, default the active one) and promote its index.
    `model_version` may also name an embedder not registered yet, a preset or a checkpoint directory: it is
    registered first (how a corpus moves to another embedder)."""
    wanted = ctx.params.get("model_version")
    model = model_row(ctx.settings, wanted) if wanted else ensure_active_model(ctx.settings)
    if model is None and is_embedder_spec(wanted):
        with session_scope(ctx.settings.resolved_database_url) as session:
            model = register_embedder(session, ctx.settings, wanted)
            session.flush()
            session.expunge(model)
    if model is None:
        with session_scope(ctx.settings.resolved_database_url) as session:
            raise ValueError(unknown_model_message(session, wanted))
    return publish_for_model(ctx, model, 0.05, 1.0, factory=ctx.params.get("factory"))
