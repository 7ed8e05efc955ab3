"""`retrieval index build SOURCE --ray [ADDRESS]`: the same build with the embedding fanned out over a Ray cluster.

Only step 2 changes. Registration (dedup by sha256) and publishing run on the driver through the same code as the
single-process build; in between, a Ray Data pipeline over the ids that still lack an embedding decodes files with
the one decoder in CPU tasks and embeds them in an actor pool (one model per actor, `num_gpus=1` per actor when
the cluster has GPUs, the runtime RETRIEVAL_RUNTIME picks). Each actor writes the same fsynced float16 shards with
their commit markers (index.versions.write_embedding_shard) into the shared data dir, so a killed run resumes
from the committed shards like any other. Files that do not decode come back to the driver, which soft-deletes
their rows exactly as the single-process build does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from app.db.models import ModelVersion
from app.db.session import session_scope
from app.indexing.embed import decode_for_embedding, file_uris, mark_failed, missing_embeddings, run_tag
from app.indexing.report import BuildReport, RayWorkersLost
from app.settings import Settings
from index import versions
from index.vector_index import VectorIndex

# Images per Ray block handed from decode tasks to embed actors, and per shard an actor writes: bounded so a
# block of uint8 crops stays small in the object store (128 x 3 x 224 x 224 B = 19 MB).
MAX_RAY_BATCH = 128
# Embed passes in one command: a pass that loses a node (or actor) is planned again over what is still missing.
RAY_PASSES = 3
# How long a re-planned pass waits for the cluster to drop a node that died (Ray: 5 missed 3 s health checks).
RAY_NODE_LOSS_WAIT_S = 30.0


def _decode_batch(batch: dict[str, np.ndarray], config: Any, max_bytes: int, max_pixels: int) -> dict[str, Any]:
    """Ray CPU task: decode + crop each file (uint8; the actor normalises); failed rows keep zero pixels and
    their reason."""
    from models.embedder import eval_transform

    crop = eval_transform(config).crop
    pixels, errors = [], []
    for uri in batch["uri"]:
        tensor, reason = decode_for_embedding(str(uri), crop, max_bytes, max_pixels, config.resize_size)
        pixels.append(None if tensor is None else tensor.numpy())
        errors.append(reason)
    shape = next((p.shape for p in pixels if p is not None), (3, config.image_size, config.image_size))
    stacked = np.stack([p if p is not None else np.zeros(shape, np.uint8) for p in pixels])
    return {"id": batch["id"], "uri": batch["uri"], "error": np.asarray(errors, dtype=object), "pixels": stacked}


class _EmbedActor:
    """One model per actor; each batch it embeds becomes one committed embedding shard."""

    def __init__(self, settings: Settings, model_path: str, store: str) -> None:
        from app.inference import load_runner
        from models.embedder import eval_transform

        self.settings, self.store = settings, store
        self.runner = load_runner(settings, model_path)
        self.normalize = eval_transform(self.runner.config).normalize
        self.tag = run_tag("ray")
        self.shard_no = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        ids = np.asarray(batch["id"], dtype=np.int64)[ok]
        if len(ids):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            step = self.settings.batch_size
            vectors = np.concatenate([self.runner.run(self.normalize(pixels[i:i + step]))
                                      for i in range(0, len(ids), step)])
            versions.write_embedding_shard(self.store, f"{self.tag}-{self.shard_no:05d}", ids, vectors)
            self.shard_no += 1
        return {"id": batch["id"], "uri": batch["uri"], "error": batch["error"], "embedded": ok}


@contextmanager
def connected(address: str | None) -> Iterator[None]:
    """Join (address, or 'auto') or start (None or '') a Ray cluster for the block, unless Ray is already up
    in this process; shut down only what this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _fill_part(trained: np.ndarray, dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Ray task: a copy of the trained IVF (serialized) filled with one embedding shard, serialized back."""
    import faiss

    from index.vector_index import VectorIndex

    part = VectorIndex(dim, factory, index=faiss.deserialize_index(trained))
    part.add(ids, vectors)
    return faiss.serialize_index(part.index)


def ray_fill_parts(trained: VectorIndex, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[VectorIndex]:
    """index.builders.fill_parts on the cluster: every part's copy of the trained IVF filled by its own task
    (assigning vectors to lists is the costly part of adding), merged afterwards by FAISS's on-disk merge."""
    import faiss
    import ray

    fill = ray.remote(num_cpus=1)(_fill_part)
    blob = ray.put(faiss.serialize_index(trained.index))
    futures = [fill.remote(blob, trained.dim, trained.factory, ids, vectors) for ids, vectors in parts]
    return [VectorIndex(trained.dim, trained.factory, index=faiss.deserialize_index(ray.get(future)))
            for future in futures]


def embed_actor_count(settings: Settings, resources: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor): one per GPU on a GPU cluster, else RETRIEVAL_RAY_EMBED_ACTORS or half the CPUs
    (the other half decodes). CPU actors hold one CPU each, so at most CPUs - 1 of them: decoding needs one."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus:
        return min(settings.ray_embed_actors or gpus, gpus), 1.0
    wanted = settings.ray_embed_actors or cpus // 2
    return max(1, min(wanted, cpus - 1)), 0.0


def _lost_workers() -> tuple[type[BaseException], ...]:
    """Ray's errors for a node, actor, worker or object lost (not a bug in our code): worth a new plan."""
    from ray import exceptions as rex

    return (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.WorkerCrashedError,
            rex.LocalRayletDiedError)


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _alive_nodes_if_answering() -> int | None:
    """_alive_nodes(), or None when the cluster does not answer (its head died with the lost worker)."""
    try:
        return _alive_nodes()
    except Exception:
        return None


def _alive_resources() -> dict[str, float]:
    """CPUs and GPUs of the nodes the cluster's control store counts as alive (ray.cluster_resources() still
    counts a node for a while after it died: a pass planned on it put two actors on a head with two CPUs, and the
    decode tasks waited forever for a CPU)."""
    import ray

    totals: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name in ("CPU", "GPU"):
                totals[name] = totals.get(name, 0.0) + float(node.get("Resources", {}).get(name, 0.0))
    return totals


def _await_node_loss(nodes_before: int) -> None:
    """After a lost worker: wait (at most RAY_NODE_LOSS_WAIT_S) for the control store to drop a node that died,
    so the next pass is planned on the nodes really alive. Ray notices a dead node by missed health checks (15 s
    by default), later than the driver sees its actor die; a worker process that crashed on a live node costs
    the whole wait."""
    deadline = time.monotonic() + RAY_NODE_LOSS_WAIT_S
    while time.monotonic() < deadline:
        alive = _alive_nodes_if_answering()
        if alive is None or alive < nodes_before:  # no answer: the next pass fails on it and says so
            return
        time.sleep(0.5)


def ray_embed_missing(settings: Settings, model: ModelVersion, report: BuildReport, progress: bool,
                      address: str | None = None) -> None:
    """Embed every live image with no committed shard for `model` on a Ray cluster (see the module docstring).

    A node (or actor) lost mid-run fails the pass; the work left (ids with no committed shard) is then planned
    again on the nodes still alive, at most RAY_PASSES times, before RayWorkersLost says to run it again."""
    todo = missing_embeddings(settings, model, None)
    if len(todo) == 0:
        return
    store = settings.embeddings_dir(model.name)
    with connected(address):
        start, embedded_before = time.perf_counter(), report.embedded
        actors, gpus = 0, 0.0  # as the last pass planned them
        for attempt in range(1, RAY_PASSES + 1):
            pass_start = report.embedded
            nodes_before = _alive_nodes_if_answering() or 0  # no answer: the pass below fails on it
            try:
                actors, gpus = _embed_pass(settings, model, todo, report, progress)
                break
            except _lost_workers() as exc:
                # What the pass committed, including shards whose rows never made it back to the driver.
                committed = len(np.intersect1d(todo, versions.embedded_ids(store)))
                report.embedded = pass_start + committed
                left = missing_embeddings(settings, model, None)
                reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else "no detail"
                nodes = _alive_nodes_if_answering()
                alive = "the cluster does not answer" if nodes is None else f"{nodes} node(s) alive now"
                lost = (f"the Ray cluster lost a worker mid-build ({type(exc).__name__}: {reason}; {alive}); the "
                        f"{committed} images of this pass with committed embeddings are kept")
                if attempt == RAY_PASSES:
                    raise RayWorkersLost(f"{lost}. Gave up after {RAY_PASSES} passes: run the same command again "
                                         "to resume from the committed shards") from exc
                print(f"{lost}; embedding the {len(left)} left on the nodes alive "
                      f"(pass {attempt + 1} of {RAY_PASSES})", file=sys.stderr, flush=True)
                _await_node_loss(nodes_before)
                todo = left
                if len(todo) == 0:
                    break
        elapsed = time.perf_counter() - start
        report.images_per_second = (report.embedded - embedded_before) / elapsed if elapsed > 0 else 0.0
        if progress:
            print(f"embedded {report.embedded - embedded_before} images on Ray ({_alive_nodes()} nodes, {actors} "
                  f"embed actors{', 1 GPU each' if gpus else ''}) in {elapsed:.1f}s: "
                  f"{report.images_per_second:.1f} images/s")


def _embed_pass(settings: Settings, model: ModelVersion, todo: np.ndarray, report: BuildReport,
                progress: bool) -> tuple[int, float]:
    """One Ray Data pipeline over `todo`, sized to the cluster as it is now; returns (actors, GPUs per actor).
    Files that do not decode are soft-deleted as they come back, so a failed pass loses none of them."""
    import ray
    from tqdm import tqdm

    from models.checkpoint import read_config

    url = settings.resolved_database_url
    with session_scope(url) as session:
        uris = [u.decode("utf-8") for u in file_uris(session, todo)]
    resources = _alive_resources()
    if not resources.get("GPU") and resources.get("CPU", 0) < 2:  # an embed actor and a decode task: else a hang
        raise RayWorkersLost(f"the Ray cluster has {resources.get('CPU', 0):g} CPU and no GPU ({_alive_nodes()} "
                             "node(s) alive): an embed actor and the decode tasks need 2 CPUs; add a node, then "
                             "run the same command again to resume from the committed shards")
    actors, gpus = embed_actor_count(settings, resources)
    batch = max(1, min(settings.embed_flush_every, MAX_RAY_BATCH))
    config = read_config(model.path)
    items = [{"id": int(i), "uri": u} for i, u in zip(todo, uris, strict=True)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // batch + 1, 4 * actors)))
    # SPREAD: decode on every node's CPUs. With the actors' explicit DEFAULT it also keeps Ray from fusing
    # decoding into the embed actors (operators with different remote args are not fused), so decoding runs
    # in its own tasks, overlapping the forward passes.
    decoded = dataset.map_batches(_decode_batch, batch_size=batch, batch_format="numpy", num_cpus=1,
                                  scheduling_strategy="SPREAD",
                                  fn_kwargs={"config": config, "max_bytes": settings.max_upload_bytes,
                                             "max_pixels": settings.max_image_pixels})
    # max_restarts=0: Ray Data's default restarts a lost actor forever; restarted on a surviving node it can
    # take the last CPU the decode tasks need and the build then waits forever (measured: two 2-CPU nodes, one
    # killed). A lost actor instead fails the pass, and the next pass is sized to the nodes alive.
    embedded = decoded.map_batches(
        _EmbedActor, batch_size=batch, batch_format="numpy", num_cpus=0 if gpus else 1, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=actors), scheduling_strategy="DEFAULT", max_restarts=0,
        fn_constructor_kwargs={"settings": settings, "model_path": str(model.path),
                               "store": str(settings.embeddings_dir(model.name))})
    bar = tqdm(total=len(todo), desc="embed (ray)", unit="img", disable=not progress, dynamic_ncols=True)
    start, embedded_before = time.perf_counter(), report.embedded
    try:
        for out in embedded.select_columns(["id", "uri", "error", "embedded"]).iter_batches(batch_format="numpy",
                                                                                              batch_size=None):
            report.embedded += int(out["embedded"].sum())
            mark_failed(url, [(int(i), str(u), str(e)) for i, u, e, ok in
                              zip(out["id"], out["uri"], out["error"], out["embedded"], strict=True) if not ok],
                        report)
            bar.update(len(out["id"]))
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{(report.embedded - embedded_before) / elapsed:.1f} img/s" if elapsed > 0 else "")
    finally:
        bar.close()
    return actors, gpus
