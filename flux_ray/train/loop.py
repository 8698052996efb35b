"""The training loop: sequences step / eval / validation / checkpoint. No Ray import.

Randomness is keyed by (seed, step, rank): noise, sigmas, latent samples and caption dropout of
step k are the same whether the run was interrupted or not, so a resumed run continues the curve.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from flux_ray.core.step import FluxLossFn
from flux_ray.data.loader import CacheReader, Sample
from flux_ray.data.prefetch import PREFETCH_BATCHES, BatchStream
from flux_ray.train.checkpoint import Position, save_checkpoint


@dataclass
class LoopParts:
    """Everything the loop needs, built by the worker."""
    spec: object
    model: torch.nn.Module            # possibly DDP/FSDP-wrapped transformer with LoRA
    params: list[torch.nn.Parameter]
    lr_scheduler: object
    loss_fn: FluxLossFn
    reader: CacheReader
    train_samples: list[Sample]
    eval_samples: list[Sample]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    state_io: object = None                         # StateIO: gather/restore LoRA + optimizer
    stepper: object = None                          # TorchStepper | DeepSpeedStepper
    lora_init: dict | None = None                   # PiSSA/OLoRA/LoftQ initial adapter (export converts)
    validate: Callable[[int], dict] | None = None   # rank-0 validation images -> metrics
    after_step: Callable[[int], None] | None = None  # e.g. profile.StepProfiler.after_step
    position: Position = field(default_factory=Position)


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, step, rank, micro)) & 0x7FFFFFFFFFFF)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def evaluate(parts: LoopParts) -> float | None:
    """Mean eval loss over all eval samples (each rank takes every world_size-th sample)."""
    ev = parts.spec.eval
    if not parts.eval_samples:
        return None
    ordered = sorted(parts.eval_samples, key=lambda s: s.order_key)
    # Every rank runs the same number of forwards (a sharded forward is a collective); padding is not counted.
    per_rank = -(-len(ordered) // parts.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=parts.device)
    parts.model.eval()
    for i in range(per_rank):
        idx = parts.rank + i * parts.world_size
        s = ordered[idx % len(ordered)]
        batch = parts.reader.batch([s]).to(parts.device)
        seed = (int(s.order_key[:8], 16) ^ ev.eval_seed) & 0x7FFFFFFF
        loss = parts.loss_fn.eval_loss(batch, [seed], ev.eval_timesteps)
        if idx < len(ordered):
            total[0] += loss.double().sum()
            total[1] += len(loss)
    parts.model.train()
    total = _all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def train_loop(parts: LoopParts, report: Callable[[dict, str | None], None]) -> dict:
    """Run until max_train_steps; ``report(metrics, checkpoint_dir_or_None)`` is called on every rank."""
    spec, pos = parts.spec, parts.position
    tr, accum = spec.train, spec.train.gradient_accumulation_steps
    dropout = {d.id: d.caption_dropout_probability for d in spec.enabled_datasets()}
    losses, t_last, samples_since = [], time.perf_counter(), 0
    last: dict = {}
    parts.model.train()
    while pos.step < tr.max_train_steps:
        windows = parts.reader.plan(parts.train_samples, tr.train_batch_size, parts.world_size, tr.seed, pos.epoch,
                                    PREFETCH_BATCHES)[parts.rank]
        n_batches = sum(len(w) for w in windows)
        usable = n_batches // accum * accum
        if usable == 0:
            raise ValueError(f"an epoch has {n_batches} batches per rank, fewer than "
                             f"train.gradient_accumulation_steps={accum}: add images or lower it")
        first, step0 = pos.batch_index, pos.step  # a resume starts at a step boundary: first % accum == 0
        stop = min(usable, first + (tr.max_train_steps - pos.step) * accum)

        def keys(i: int, first=first, step0=step0) -> torch.Generator:
            return step_generator(tr.seed, step0 + (i - first) // accum, parts.rank, (i - first) % accum)

        stream = BatchStream(parts.reader, windows, first, stop, keys, dropout, parts.device)
        try:
            last, losses, t_last, samples_since = _run_epoch(parts, stream, usable, report, last, losses, t_last,
                                                             samples_since)
        finally:
            stream.close()
        if pos.batch_index >= usable:
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
    return last


def _run_epoch(parts: LoopParts, stream: BatchStream, usable: int, report, last: dict, losses: list,
               t_last: float, samples_since: int) -> tuple:
    """Steps until the epoch's usable batches or max_train_steps run out; batches come ready from ``stream``."""
    pos, tr, accum = parts.position, parts.spec.train, parts.spec.train.gradient_accumulation_steps
    while pos.batch_index < usable and pos.step < tr.max_train_steps:
        step_loss = torch.zeros((), device=parts.device)
        for micro in range(accum):
            with torch.profiler.record_function("flux_ray.batch"):  # the data wait (bench/ray_gpu_bench.py)
                samples, batch, gen = stream.next()
            loss = parts.loss_fn(batch, gen)
            parts.stepper.micro_step(loss, micro, accum)
            step_loss += loss.detach() / accum
            samples_since += len(samples)
        parts.stepper.finish_step()
        pos.step += 1
        pos.batch_index += accum
        losses.append(step_loss)
        if parts.after_step:
            parts.after_step(pos.step)
        metrics = _maybe_report(parts, report, losses, t_last, samples_since)
        if metrics:
            last, losses, t_last, samples_since = metrics, [], time.perf_counter(), 0
    return last, losses, t_last, samples_since


def _maybe_report(parts: LoopParts, report, losses: list, t_last: float, samples: int) -> dict:
    spec, pos = parts.spec, parts.position
    step, done = pos.step, pos.step >= spec.train.max_train_steps
    want_ckpt = step % spec.train.checkpointing_steps == 0 or done
    want_eval = spec.eval.eval_steps_interval and (step % spec.eval.eval_steps_interval == 0 or done)
    want_val = parts.validate and spec.eval.validation_step_interval and (
        step % spec.eval.validation_step_interval == 0 or done)
    if not (step % spec.train.log_every == 0 or want_ckpt or want_eval or want_val):
        return {}
    loss = _all_reduce_sum(torch.stack(losses).mean().detach().double()).item() / parts.world_size
    dt = time.perf_counter() - t_last
    metrics = {"step": step, "epoch": pos.epoch, "train_loss": loss, "learning_rate": parts.lr_scheduler.get_last_lr()[0],
               "step_time_s": dt / len(losses), "samples_per_s": samples * parts.world_size / dt if dt else 0.0}
    if parts.device.type == "cuda":
        metrics["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(parts.device) / 2**30
    if want_eval:
        ev = evaluate(parts)
        if ev is not None:
            metrics["eval_loss"] = ev
    if want_val:
        metrics.update(parts.validate(step))
    if want_ckpt:
        lora_sd, optim_sd = parts.state_io.gather()  # a collective when sharded: every rank
        with tempfile.TemporaryDirectory(prefix="flux_ray_ckpt_") as d:
            ckpt = None
            if parts.rank == 0:
                save_checkpoint(d, lora_sd=lora_sd, optim_sd=optim_sd, lr_scheduler=parts.lr_scheduler,
                                position=pos, extra={"metrics": metrics}, lora_init_sd=parts.lora_init)
                ckpt = d
            report(metrics, ckpt)
    else:
        report(metrics, None)
    return metrics
