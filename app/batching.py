"""Dynamic micro-batching: concurrent queries are coalesced into one forward pass on the device.

Each request preprocesses its own image (in the thread pool, in parallel) and submits the tensor. One batcher
task takes the first waiting query, then whatever else arrives within `max_wait_ms` up to `max_batch_size`,
stacks them and runs one forward pass on a dedicated thread. While that pass runs, new queries queue up, so
under load batches fill without waiting at all. The queue is bounded: when it is full `submit` raises
`QueueFull` at once and the API answers 503 with Retry-After instead of letting latency grow without bound.

A query carries the deployment it started on; a batch holding queries of two deployments (a hot swap landed
between them) runs one forward pass per deployment, so every request finishes on the pair it began with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from app import metrics

log = logging.getLogger(__name__)


class Forward(Protocol):
    def forward_batch(self, pixels: torch.Tensor) -> np.ndarray: ...


def default_max_batch_size(device_type: str) -> int:
    """The batch cap when RETRIEVAL_MAX_BATCH_SIZE is 0. CPU: 4. With the serving thread budget the runtime gains
    nothing per image from bigger batches (OpenVINO fp32, Lite0, 1 thread: 227 / 222 / 201 / 199 img/s at b = 1 /
    4 / 8 / 16), so they only make the queries that fill them wait: at 32 clients on 2 cores, 4 served more
    queries/s than 16 with a lower p99 (docs/benchmarks.md). CUDA: 32, where a bigger batch fills the device."""
    return 32 if device_type == "cuda" else 4


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 503 with Retry-After."""


@dataclass
class _Query:
    target: Forward
    pixels: torch.Tensor
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, max_batch_size: int, max_wait_ms: float, max_queue: int) -> None:
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self._queue: asyncio.Queue[_Query] | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread owns the device: forward passes never overlap, and the request thread pool stays free.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                query = self._queue.get_nowait()
                if not query.future.done():
                    query.future.set_exception(QueueFull("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, target: Forward, pixels: torch.Tensor) -> np.ndarray:
        """Embed one preprocessed image [C, H, W] with `target`; returns its vector [D]."""
        if self._queue is None:
            raise RuntimeError("the micro-batcher is not started")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Query(target, pixels, future))
        except asyncio.QueueFull:
            metrics.REJECTED.inc()
            raise QueueFull(f"{self.max_queue} queries are already waiting") from None
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return await future

    async def _collect(self, queue: asyncio.Queue[_Query]) -> list[_Query]:
        batch = [await queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(queue)
            metrics.QUEUE_DEPTH.set(queue.qsize())
            live = [q for q in batch if not q.future.done()]  # skip queries whose client went away
            groups: dict[int, list[_Query]] = {}
            for query in live:
                groups.setdefault(id(query.target), []).append(query)
            for group in groups.values():
                started = time.perf_counter()
                for query in group:
                    metrics.STAGE_SECONDS.labels("queue").observe(started - query.enqueued)
                try:
                    pixels = torch.stack([q.pixels for q in group])
                    vectors = await loop.run_in_executor(self._executor, group[0].target.forward_batch, pixels)
                except Exception as exc:  # fail these queries, keep the batcher alive
                    log.exception("forward pass failed for a batch of %d", len(group))
                    for query in group:
                        if not query.future.done():
                            query.future.set_exception(exc)
                    continue
                metrics.STAGE_SECONDS.labels("forward").observe(time.perf_counter() - started)
                metrics.BATCH_SIZE.observe(len(group))
                for query, vector in zip(group, vectors, strict=True):
                    if not query.future.done():
                        query.future.set_result(vector)


class AdmissionGate:
    """The batcher's overload rule for work that cannot join its batches (explain heatmaps: several torch forward
    passes each, on the thread pool): at most `running` at once and `max_waiting` more waiting; past that `admit`
    raises QueueFull at once, so a flood gets the same 503 JSON (Retry-After) instead of piling up threads."""

    def __init__(self, running: int, max_waiting: int, what: str) -> None:
        self.running = max(1, running)
        self.limit = self.running + max(0, max_waiting)
        self.what = what
        self.admitted = 0  # running + waiting; only touched on the event loop
        self._slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.admitted >= self.limit:
            metrics.REJECTED.inc()
            raise QueueFull(f"{self.admitted} {self.what} are already running or waiting")
        if self._slots is None:  # made on the serving loop, on first use
            self._slots = asyncio.Semaphore(self.running)
        self.admitted += 1
        try:
            async with self._slots:
                yield
        finally:
            self.admitted -= 1
