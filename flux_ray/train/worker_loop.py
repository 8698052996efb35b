"""One worker's run, whoever hosts it: build the loop's parts, restore a checkpoint, run the loop. No Ray import.

A Train worker (train/worker.py) and a one-worker sweep trial run in its Tune actor (tune/local_trial.py) both
call :func:`run_worker`; each passes its own checkpoint (``ray.train`` / ``ray.tune.get_checkpoint()``) and
report function.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from flux_ray.spec import JobSpec
from flux_ray.train.loop import LoopParts, Report, train_loop

log = logging.getLogger("flux_ray.worker")


def run_worker(spec: JobSpec, device: torch.device, rank: int, world_size: int, *, checkpoint, report: Report,
               wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m, reuse_base: bool = False,
               started_at: float | None = None, startup: dict | None = None) -> dict:
    """Train the spec on this worker; ``checkpoint``: the run's own checkpoint (an object with
    ``as_directory()``) or None; ``startup``: more start-up metrics for the first report. Returns the last
    reported metrics."""
    from flux_ray.train.build import build_loop_parts

    started_at = started_at or time.time()
    parts = build_loop_parts(spec, device, rank, world_size, wrap=wrap, reuse_base=reuse_base)
    try:
        restore(parts, checkpoint)
        parts.startup.update(startup or {}, worker_started_at=started_at)
        add_profiler(parts)
        if parts.position.step:
            # warning: Ray's workers show WARNING and above in the job's logs, and a resume should be seen there
            log.warning("rank %d resumes at step %d (epoch %d, batch %d)", parts.rank, parts.position.step,
                        parts.position.epoch, parts.position.batch_index)
        return train_loop(parts, report)
    finally:
        release(parts)


def restore(parts: LoopParts, checkpoint) -> None:
    """The run's own checkpoint when there is one (a restart, or the run resumed by name: the driver checked its
    identity, and refuses resume_from_checkpoint: null over old checkpoints), else an explicit
    train.resume_from_checkpoint."""
    from flux_ray.train.checkpoint import load_checkpoint

    spec = parts.spec
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            parts.position = load_checkpoint(d, state_io=parts.state_io, lr_scheduler=parts.lr_scheduler)
    elif spec.train.resume_from_checkpoint not in (None, "latest"):
        from flux_ray.node_cache import local_path  # an s3:// checkpoint is fetched once per node

        parts.position = load_checkpoint(local_path(spec.train.resume_from_checkpoint, spec.storage),
                                         state_io=parts.state_io, lr_scheduler=parts.lr_scheduler)


def add_profiler(parts: LoopParts) -> None:
    from flux_ray.train.profile import StepProfiler

    profiler = StepProfiler.from_env(parts.rank, parts.device)
    hooks = [h for h in (parts.after_step, profiler.after_step if profiler else None) if h]

    def after_step(step: int) -> None:
        for hook in hooks:
            hook(step)
    parts.after_step = after_step if hooks else None


def release(parts: LoopParts) -> None:
    """Drop what this run allocated beside the model (gradients, optimizer moments): a cached model outlives
    the run, and an early stop must leave its memory to the next trial."""
    for p in parts.params:
        p.grad = None
    optimizer = getattr(parts.state_io, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "state"):
        optimizer.state.clear()
