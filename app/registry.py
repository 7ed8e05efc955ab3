"""Model and index versions: registering, finding the active pair, and promoting a pair atomically.

The active IndexVersion row (and the ModelVersion it was built with) is what the service serves. Files are
written first (checkpoint dirs, index dirs renamed into place); the SQL flip to 'active' comes last, in one
transaction, so a reader never sees a half-built version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db.models import IndexVersion, ModelVersion
from app.db.session import session_scope
from app.settings import Settings


def new_version_name(prefix: str) -> str:
    return f"{prefix}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"


def active_index(session: Session) -> IndexVersion | None:
    return session.scalar(select(IndexVersion).where(IndexVersion.status == "active"))


def active_model(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.status == "active"))


def register_model(session: Session, checkpoint_dir: Path, name: str,
                   arch: str, dim: int, metrics: dict | None = None, status: str = "candidate") -> ModelVersion:
    version = ModelVersion(name=name, arch=arch, dim=dim, path=str(checkpoint_dir), metrics=metrics or {},
                           status=status)
    if status == "active":
        session.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
        version.activated_at = datetime.now(UTC)
    session.add(version)
    session.flush()
    return version


def ensure_model_version(session: Session, settings: Settings) -> ModelVersion:
    """The model the next build embeds with: the active one, else `settings.embedder` saved as a version."""
    active = active_model(session)
    if active is not None:
        return active
    return register_embedder(session, settings, settings.embedder, status="active")


def embedder_version_name(spec: str) -> str:
    """The version name an embedder spec (a preset name or a checkpoint directory) is registered under."""
    from models.checkpoint import is_checkpoint

    return Path(spec).name if is_checkpoint(spec) else spec


def is_embedder_spec(spec: str) -> bool:
    from models.checkpoint import is_checkpoint
    from models.zoo import PRESETS

    return spec in PRESETS or is_checkpoint(spec)


def unknown_model_message(session: Session, wanted: str) -> str:
    """What to say of a model version name that is neither registered nor an embedder: what it could be."""
    from models.zoo import PRESETS

    names = session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)).all()
    return (f"model version {wanted!r} does not exist: name a registered version ({', '.join(names) or 'none yet'}), "
            f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")


def name_taken(existing: ModelVersion, spec: str) -> str | None:
    """Why checkpoint directory `spec` cannot be the registered version of its name, or None: a version of that
    name registered from another directory (run1/best and run2/best are both 'best') would be used instead of it,
    silently. A preset, or a version registered before the source was recorded, is taken as the same."""
    source = (existing.metrics or {}).get("registered_from")
    if source is None or not Path(spec).is_dir() or Path(spec).resolve() == Path(source):
        return None
    return (f"a model version named {existing.name!r} is already registered from {source}, not {Path(spec).resolve()}:"
            " copy the checkpoint to a directory with another name and name that")


def register_embedder(session: Session, settings: Settings, spec: str, status: str = "candidate") -> ModelVersion:
    """The version of embedder `spec` (a preset name or a checkpoint directory): the one registered under its name
    from it (made `active` if asked), else its checkpoint saved under the models dir and registered with `status`.
    A version of that name from another directory is a ValueError (see name_taken)."""
    from models.checkpoint import is_checkpoint, read_config, save_checkpoint
    from models.zoo import create_embedder

    name = embedder_version_name(spec)
    existing = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if existing is not None:
        if (taken := name_taken(existing, spec)) is not None:
            raise ValueError(taken)
        if status == "active" and existing.status != "active":
            existing.status = "active"
            existing.activated_at = datetime.now(UTC)
        return existing
    target = settings.models_dir / name
    if not is_checkpoint(target):
        save_checkpoint(create_embedder(spec), target)
    config = read_config(target)
    arch = config.arch if config.arch != "timm" else config.backbone
    source = {"registered_from": str(Path(spec).resolve())} if is_checkpoint(spec) else {}
    return register_model(session, target.resolve(), name, arch, config.dim, metrics=source, status=status)


def promote(session: Session, index_version: IndexVersion) -> None:
    """Make `index_version` and its model the active pair; retire the previous pair. One transaction."""
    now = datetime.now(UTC)
    session.execute(
        update(IndexVersion)
        .where(IndexVersion.status == "active", IndexVersion.id != index_version.id)
        .values(status="retired")
    )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == "active", ModelVersion.id != index_version.model_version_id)
        .values(status="retired")
    )
    index_version.status = "active"
    index_version.activated_at = now
    model = session.get(ModelVersion, index_version.model_version_id)
    if model is not None and model.status != "active":
        model.status = "active"
        model.activated_at = now


def ensure_active_model(settings: Settings) -> ModelVersion:
    """`ensure_model_version` in its own transaction, detached: the model an index build or a job embeds with."""
    with session_scope(settings.resolved_database_url) as session:
        model = ensure_model_version(session, settings)
        session.expunge(model)
    return model
