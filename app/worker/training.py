"""The training job (kind 'train'):

  1. the labelled live images of the store, classes split into train and validation deterministically (the split
     is saved in the job's directory, so a re-run uses the same one even if images arrived meanwhile). With a
     graded loss (`loss: {name: log_ratio, label_key: KEY}`) the label is instead the number stored under KEY in
     each image's metadata, images without one are left out, and the split is by image;
  2. models.train.train() fine-tunes the active model (IRT recipe by default: contrastive + cross-batch memory +
     KoLeo, lambda 0.7) in <data_dir>/jobs/<id>/train, resuming from its last checkpoint after a crash;
  3. the candidate and the active model are evaluated on the same validation split (Recall@K, MAP@R; for graded
     labels Spearman of distances and nDCG@10, models/graded.py);
  4. the candidate is registered as a model version with its metrics (status 'candidate');
  5. if it is better (Recall@1, then MAP@R) or `force_promote` is set: the whole corpus is re-embedded with it and
     a new index version is built and promoted together with the model in one SQL transaction
     (app.worker.index_jobs.publish_for_model). The service hot-swaps to the new pair.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

from sqlalchemy import select

from app.db.models import Image
from app.db.session import session_scope
from app.jobs import TRAIN_FIELDS
from app.registry import ensure_active_model
from app.settings import Settings
from app.worker.context import JobContext, JobStopped, fixed
from app.worker.index_jobs import active_index_name, model_row, publish_for_model

SPLIT_FILE = "split.json"


def labelled_items(settings: Settings) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label index) of every live labelled image, and the class names (label i = names[i], sorted)."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Image.uri, Image.label).where(Image.deleted_at.is_(None), Image.label.is_not(None))
            .order_by(Image.id)
        ).all()
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return [(uri.removeprefix("file://"), index[label]) for uri, label in rows], names


def graded_items(settings: Settings, label_key: str) -> list[tuple[str, float]]:
    """(path, number) of every live image whose metadata holds a number under `label_key` (booleans are not)."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Image.uri, Image.meta).where(Image.deleted_at.is_(None)).order_by(Image.id)
        ).all()
    items = []
    for uri, meta in rows:
        value = (meta or {}).get(label_key)
        if isinstance(value, str):  # metadata arrives from forms as text: "0.25" is a number too
            try:
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            items.append((uri.removeprefix("file://"), float(value)))
    return items


def graded_label_key(params: dict[str, Any]) -> str | None:
    """The metadata key of a graded loss's labels; None for class labels. ValueError when a graded loss has none."""
    from models.graded import is_graded

    loss = train_config(params).loss
    if not is_graded(loss):
        return None
    if not loss.get("label_key"):
        raise ValueError(f"the {loss['name']} loss needs loss.label_key: the image metadata key of the graded label")
    return str(loss["label_key"])


def class_split(ctx: JobContext) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Train/validation items with disjoint classes (graded labels: disjoint images); fixed at the job's first
    run (saved in its directory)."""
    label_key = graded_label_key(ctx.params)

    def compute() -> dict[str, Any]:
        from models.data import split_items
        from models.graded import random_split

        fraction = float(ctx.params.get("val_fraction", 0.25))
        seed = int(ctx.params.get("split_seed", 0))
        if label_key is not None:
            graded = graded_items(ctx.settings, label_key)
            if len(graded) < 8:
                raise ValueError(f"training on graded labels needs at least 8 live images with a number under "
                                 f"metadata key {label_key!r}; found {len(graded)}")
            train_graded, val_graded = random_split(graded, fraction, seed)
            return {"label_key": label_key, "train": train_graded, "val": val_graded}
        items, names = labelled_items(ctx.settings)
        if len(names) < 4:
            raise ValueError(f"training needs labelled images of at least 4 classes in the store; found {len(names)}")
        train_items, val_items = split_items(items, fraction, by="classes", seed=seed)
        return {"classes": names, "train": train_items, "val": val_items}

    saved = fixed(ctx, SPLIT_FILE, compute)
    return [tuple(x) for x in saved["train"]], [tuple(x) for x in saved["val"]]


def train_config(params: dict[str, Any]) -> Any:
    """TrainConfig from job params: a YAML file (`config_path`), a dict (`config`), then the shortcut fields."""
    from models.config import TrainConfig, load_config

    if params.get("config_path"):
        config = load_config(params["config_path"])
    else:
        config = TrainConfig.from_dict(dict(params.get("config") or {}))
    for name in TRAIN_FIELDS:
        if name in params:
            setattr(config, name, params[name])
    if "loss" in params:
        config.loss = dict(params["loss"])
    if "image_size" in params:  # applies when training from the config's embedder (init="config")
        config.embedder = {**config.embedder, "image_size": int(params["image_size"]),
                           "resize_size": int(params.get("resize_size", params["image_size"]))}
    return config


def _is_better(candidate: dict[str, float], baseline: dict[str, float]) -> bool:
    """Recall@1 decides; MAP@R breaks a tie (graded labels: Spearman, then nDCG@10). Equal is not better:
    promoting costs a re-embed."""
    first, second = ("spearman", "ndcg@10") if "spearman" in candidate else ("recall@1", "map@r")

    def key(m: dict[str, float]) -> tuple[float, float]:
        return round(m.get(first, 0.0), 6), round(m.get(second, 0.0), 6)

    return key(candidate) > key(baseline)


def run_train(ctx: JobContext) -> dict[str, Any]:
    from app.images import file_loader
    from models.checkpoint import load_checkpoint, read_config
    from models.evaluate import evaluate_items
    from models.graded import evaluate_graded_items
    from models.train import train

    settings, params = ctx.settings, ctx.params
    load_image = file_loader(settings)  # train and judge on the pixels the service decodes
    config = train_config(params)
    train_items, val_items = class_split(ctx)
    ctx.progress(0.02, f"split: {len(train_items)} train / {len(val_items)} validation images "
                       f"({len({y for _, y in train_items})} / {len({y for _, y in val_items})} classes)")
    active = fixed(ctx, "baseline.json", lambda: {"name": (m := ensure_active_model(settings)).name, "path": m.path})
    init = None if params.get("init") == "config" else active["path"]

    def on_record(entry: dict[str, Any]) -> None:
        fraction = 0.02 + 0.68 * min(1.0, entry.get("step", 0) / max(1, config.steps))
        shown = {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)}
        ctx.progress(fraction, f"{entry.get('event')} step {entry.get('step')}/{config.steps} {shown}")

    nproc = int(params.get("nproc", 1))
    processes = 1
    if nproc > 1:  # DDP under torchrun (app/worker/torchrun_train.py), resumable from the same directory
        from app.worker.torchrun_train import train_under_torchrun

        result, processes = train_under_torchrun(ctx, config, train_items, val_items, ctx.dir / "train", init, nproc,
                                                 on_record)
    else:
        result = train(config, train_items, val_items, ctx.dir / "train", load_image, init_checkpoint=init,
                       device=settings.device, progress=on_record, should_stop=ctx.should_stop)
    if result.stopped:
        raise JobStopped(ctx.stop_reason())
    ctx.check()

    graded = graded_label_key(params) is not None
    ks = tuple(params.get("ks", (1, 2, 4, 8)))

    def evaluate(checkpoint: str) -> dict[str, float]:
        model = load_checkpoint(checkpoint)
        if graded:
            return evaluate_graded_items(model, val_items, load_image, num_workers=workers)
        return evaluate_items(model, val_items, load_image, ks, num_workers=workers)

    ctx.progress(0.72, "evaluating the candidate and the active model on the validation split")
    workers = min(config.num_workers, 2)
    # Fixed at the first evaluation: a re-run after a crash compares against the same baseline, even if the
    # candidate was already promoted by the run that crashed.
    evaluation = fixed(ctx, "evaluation.json", lambda: {
        "candidate": evaluate(str(result.best_checkpoint_dir)),
        "baseline": evaluate(active["path"]),
    })
    candidate_metrics, active_metrics = evaluation["candidate"], evaluation["baseline"]
    better = _is_better(candidate_metrics, active_metrics)
    promote = better or bool(params.get("force_promote", False))
    summary = {"candidate": candidate_metrics, "baseline": active_metrics, "baseline_model": active["name"],
               "better": better, "train_steps": result.step, "train_processes": processes,
               "promoted": False}
    shown = ("spearman", "ndcg@10") if graded else ("recall@1", "map@r")

    def describe(m: dict[str, float]) -> str:
        return " ".join(f"{name}={m.get(name, 0):.4f}" for name in shown)

    ctx.progress(0.78, f"candidate {describe(candidate_metrics)} vs active {active['name']} "
                       f"{describe(active_metrics)}", **summary)

    # Register the candidate (idempotent: a re-run after a crash finds the row by its name).
    name = str(params.get("name") or f"model-job{ctx.job_id}")
    model = model_row(settings, name)
    if model is None:
        from app.registry import register_model

        target = settings.models_dir / name
        tmp = settings.models_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(result.best_checkpoint_dir, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # the files are in place before the row exists
        config_used = read_config(target)
        with session_scope(settings.resolved_database_url) as session:
            model = register_model(session, target.resolve(), name,
                                   config_used.backbone if config_used.arch == "timm" else config_used.arch,
                                   config_used.dim, metrics={**candidate_metrics, "job_id": ctx.job_id,
                                                             "baseline": active_metrics,
                                                             "baseline_model": active["name"]})
            session.expunge(model)
    summary["model_version"] = model.name
    ctx.progress(0.8, f"registered model version {model.name}", model_version=model.name)
    if not promote:
        ctx.progress(1.0, f"not promoted: candidate {model.name} is not better than {active['name']}", **summary)
        return summary
    if model.status == "active":  # promoted by an earlier run of this job that died before recording it
        summary.update(promoted=True, index_version=active_index_name(settings))
        ctx.progress(1.0, f"{model.name} is already active", **summary)
        return summary
    ctx.check()
    why = "better" if better else "force_promote"
    published = publish_for_model(ctx, model, 0.8, 0.99, factory=params.get("factory"))
    summary.update(published, promoted=True)
    ctx.progress(1.0, f"promoted {model.name} + {published['index_version']} ({why})", **summary)
    return summary
