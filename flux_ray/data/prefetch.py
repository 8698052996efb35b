"""Batches built ahead of the training thread: a background thread serves a rank's windows in order.

While the batches of window k are built (and, on CUDA, pinned and copied to the device on a side
stream), window k+1 is read; the training thread takes ready batches from a bounded queue. The
randomness of batch i (latent noise, caption dropout) comes from ``keys(i)``, the loop's
(seed, step, rank, micro) generator, which is handed back with the batch so the loss continues it:
a streamed batch equals one built on the training thread.
"""
from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from flux_ray.core.step import FluxBatch
from flux_ray.data.loader import CacheReader, Sample, window_needs

PREFETCH_BATCHES = 4
_DONE = object()


class BatchStream:
    """Iterate (samples, device batch, generator) for batch indices ``start..stop-1`` of a rank's windows."""

    def __init__(self, reader: CacheReader, windows: list[list[list[Sample]]], start: int, stop: int,
                 keys: Callable[[int], torch.Generator], caption_dropout: dict[str, float], device: torch.device,
                 depth: int = PREFETCH_BATCHES):
        self.reader, self.windows, self.start, self.stop = reader, windows, start, stop
        self.keys, self.dropout, self.device = keys, caption_dropout, torch.device(device)
        self.wait_s: list[float] = []  # how long each next() blocked the training thread
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._thread = threading.Thread(target=self._produce, name="flux_ray-batches", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            with_empty = any(p > 0 for p in self.dropout.values())
            spans, first = [], 0
            for w in self.windows:  # windows overlapping [start, stop)
                if first < self.stop and first + len(w) > self.start:
                    spans.append((first, w))
                first += len(w)
            with ThreadPoolExecutor(1, thread_name_prefix="flux_ray-window") as pool:
                pending = pool.submit(self.reader.load, *window_needs(spans[0][1], with_empty)) if spans else None
                for k, (first, window) in enumerate(spans):
                    data = pending.result()
                    pending = (pool.submit(self.reader.load, *window_needs(spans[k + 1][1], with_empty), data)
                               if k + 1 < len(spans) else None)
                    for i in range(max(first, self.start), min(first + len(window), self.stop)):
                        if self._stop.is_set():
                            return
                        self._put(self._make(i, window[i - first], data))
                    del data
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(e)

    def _make(self, i: int, samples: list[Sample], data) -> tuple:
        gen = self.keys(i)
        rng = random.Random(gen.initial_seed())
        batch = self.reader.build(data, samples, gen, self.dropout, rng)
        event = None
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                batch = batch.map_tensors(lambda t: t.pin_memory().to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        return samples, batch, gen, event

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[list[Sample], FluxBatch, torch.Generator]:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s.append(time.perf_counter() - t0)
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        samples, batch, gen, event = item
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in batch.tensors():
                t.record_stream(current)
        elif batch.latents.device != self.device:
            batch = batch.to(self.device)
        return samples, batch, gen

    def __iter__(self):
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
