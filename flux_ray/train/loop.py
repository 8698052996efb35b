"""The training loop: sequences step / eval / validation / checkpoint. No Ray import.

Randomness is keyed by (seed, step, rank): noise, sigmas, latent samples and caption dropout of
step k are the same whether the run was interrupted or not, so a resumed run continues the curve.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.distributed as dist

from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.data.loader import CacheReader, Sample
from flux_ray.data.prefetch import PREFETCH_BATCHES, BatchStream
from flux_ray.train.checkpoint import Position, save_checkpoint
from flux_ray.train.startup import compile_breakdown, compiled_graphs
from flux_ray.train.state_io import StateIO
from flux_ray.train.stepper import Stepper

if TYPE_CHECKING:
    from flux_ray.spec import JobSpec

TIMED_FIRST_STEPS = 4
"""Steps timed with a device sync at the start of each run (``startup_first_step_s``, ``startup_step_<n>_s``)."""
Report = Callable[[dict, "str | None"], None]
"""``report(metrics, checkpoint_dir_or_None)``: Ray Train's report on a worker, a list append in tests."""


@dataclass(kw_only=True)
class StepParts:
    """What one optimizer step needs; bench/train_step_bench.py builds only these."""
    loss_fn: FluxLossFn
    stepper: Stepper                                 # TorchStepper | FlatAllReduceStepper | DeepSpeedStepper
    device: torch.device
    gradient_accumulation_steps: int = 1
    after_step: Callable[[int], None] | None = None  # e.g. profile.StepProfiler.after_step


@dataclass(kw_only=True)
class LoopParts(StepParts):
    """Everything the loop needs, built by the worker (train/build.py)."""
    spec: JobSpec
    model: torch.nn.Module            # the transformer with LoRA; DDP/FSDP-wrapped or not (gradient_sync allreduce)
    params: list[torch.nn.Parameter]
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    reader: CacheReader
    train_samples: list[Sample]
    eval_samples: list[Sample]
    rank: int = 0
    world_size: int = 1
    state_io: StateIO | None = None                 # gather/restore LoRA + optimizer
    lora_init: dict | None = None                   # PiSSA/OLoRA/LoftQ initial adapter (export converts)
    validate: Callable[[int], dict] | None = None   # rank-0 validation images -> metrics
    position: Position = field(default_factory=Position)
    startup: dict = field(default_factory=dict)
    """Start-up timings (``startup_*`` seconds; ``*_at`` wall-clock times: ``worker_started_at``,
    ``first_step_done_at``...), sent once with the first report."""


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


def train_step(parts: StepParts, batches: Iterator[tuple[FluxBatch, torch.Generator]],
               position: Position) -> torch.Tensor:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches (batch, generator) from ``batches``
    through the loss and the stepper's backward, then its optimizer step. Advances ``position``; returns
    the step's mean loss, detached and on the device (no host sync)."""
    accum = parts.gradient_accumulation_steps
    step_loss = torch.zeros((), device=parts.device)
    for micro in range(accum):
        with torch.profiler.record_function("flux_ray.batch"):  # the data wait (bench/ray_gpu_bench.py)
            batch, gen = next(batches)
        loss = parts.loss_fn(batch, gen)
        parts.stepper.micro_step(loss, micro, accum)
        step_loss += loss.detach() / accum
    parts.stepper.finish_step()
    position.step += 1
    position.batch_index += accum
    if parts.after_step:
        parts.after_step(position.step)
    return step_loss


@dataclass
class Tally:
    """Steps since the last report: their losses, when the window began, samples seen on this rank."""
    losses: list[torch.Tensor] = field(default_factory=list)
    since: float = field(default_factory=time.perf_counter)
    samples: int = 0
    last: dict = field(default_factory=dict)  # the last reported metrics


def train_loop(parts: LoopParts, report: Report) -> dict:
    """Run until max_train_steps; ``report(metrics, checkpoint_dir_or_None)`` is called on every rank."""
    spec, pos = parts.spec, parts.position
    tr, accum = spec.train, spec.train.gradient_accumulation_steps
    dropout = {d.id: d.caption_dropout_probability for d in spec.enabled_datasets()}
    tally = Tally()
    timed = 0  # this run's steps timed so far (TIMED_FIRST_STEPS)
    parts.stepper.start()  # after the build and any restore: e.g. rank 0's LoRA to every unwrapped replica
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
            batches = _counted(stream, tally)
            while pos.batch_index < usable and pos.step < tr.max_train_steps:
                n = timed + 1 if timed < TIMED_FIRST_STEPS else 0  # this step's number among the timed ones
                t0 = time.perf_counter() if n else None
                graphs0 = compiled_graphs() if n == 1 and spec.train.compile else None
                tally.losses.append(train_step(parts, batches, pos))
                if n:  # wall time of each of this run's first steps: compile, CUDA graph warm-up and recording
                    if parts.device.type == "cuda":
                        torch.cuda.synchronize(parts.device)
                    _record_first_steps(parts, n, time.perf_counter() - t0, graphs0)
                    timed = n
                report_step(parts, tally, report)
        finally:
            stream.close()
        if pos.batch_index >= usable:
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
    return tally.last


def _record_first_steps(parts: LoopParts, n: int, seconds: float, graphs0: int | None) -> None:
    """Step ``n`` of the timed ones: ``startup_first_step_s`` (compile or artifact load, first batch) with the
    graphs it compiled and its compile breakdown, then ``startup_step_<n>_s`` (under CUDA graphs the second step
    warms the graphs up and the third records them)."""
    if n > 1:
        parts.startup[f"startup_step_{n}_s"] = seconds
        return
    parts.startup["startup_first_step_s"] = seconds
    if graphs0 is not None:  # 0 when a reused model's compiled blocks served the step
        parts.startup["startup_graphs_compiled"] = compiled_graphs() - graphs0
    parts.startup["first_step_done_at"] = time.time()  # wall clock: the driver's train() -> here
    # torch's counters are per process: only this run's when it compiled (not a reused model)
    if parts.spec.train.compile and not parts.startup.get("startup_reused_base"):
        parts.startup.update(compile_breakdown())


def _counted(stream: BatchStream, tally: Tally) -> Iterator[tuple[FluxBatch, torch.Generator]]:
    """The stream's ready batches as ``train_step`` takes them, counting samples for samples_per_s."""
    while True:
        try:
            samples, batch, gen = stream.next()
        except StopIteration:  # an exhausted stream ends the generator (next() raises StopIteration again)
            return
        tally.samples += len(samples)
        yield batch, gen


@dataclass(frozen=True)
class Due:
    """What a finished step owes: a log line, an eval loss, validation images, a checkpoint."""
    log: bool
    evaluate: bool
    validate: bool
    checkpoint: bool

    def any(self) -> bool:
        return self.log or self.evaluate or self.validate or self.checkpoint


def due_after(parts: LoopParts, step: int) -> Due:
    """The spec's intervals at ``step``; the last step owes everything that is enabled."""
    spec = parts.spec
    done = step >= spec.train.max_train_steps
    every = lambda n: bool(n) and (step % n == 0 or done)  # noqa: E731
    return Due(log=step % spec.train.log_every == 0, evaluate=every(spec.eval.eval_steps_interval),
               validate=parts.validate is not None and every(spec.eval.validation_step_interval),
               checkpoint=step % spec.train.checkpointing_steps == 0 or done)


def report_step(parts: LoopParts, tally: Tally, report: Report) -> None:
    """After a step: when something is due, the training metrics, eval and validation, then one report
    (with a checkpoint when one is due); resets the tally."""
    due = due_after(parts, parts.position.step)
    if not due.any():
        return
    metrics = training_metrics(parts, tally)
    metrics.update(evaluation_metrics(parts, due))
    save_and_report(parts, metrics, report) if due.checkpoint else report(metrics, None)
    tally.last, tally.losses, tally.since, tally.samples = metrics, [], time.perf_counter(), 0


def training_metrics(parts: LoopParts, tally: Tally) -> dict:
    """Mean train loss over the window (all ranks), learning rate, step time, throughput, peak memory."""
    pos = parts.position
    loss = _all_reduce_sum(torch.stack(tally.losses).mean().detach().double()).item() / parts.world_size
    dt = time.perf_counter() - tally.since
    metrics = {"step": pos.step, "epoch": pos.epoch, "train_loss": loss,
               "learning_rate": parts.lr_scheduler.get_last_lr()[0], "step_time_s": dt / len(tally.losses),
               "samples_per_s": tally.samples * parts.world_size / dt if dt else 0.0}
    if parts.device.type == "cuda":
        metrics.update(gpu_memory_metrics(parts))
    if not tally.last:  # the first report of this process: how long start-up took
        metrics.update(parts.startup)
    return metrics


def gpu_memory_metrics(parts: LoopParts) -> dict:
    """``step_peak_gpu_mem_gib``: this GPU's peak since the build ended (steps, eval, checkpoints: what training
    needs); ``peak_gpu_mem_gib``: since the process started (the load's peak included). With several ranks also
    the maximum over ranks (``*_max``; FSDP's ranks can differ), one all-reduce; every rank calls."""
    step_peak = torch.cuda.max_memory_allocated(parts.device) / 2**30
    out = {"step_peak_gpu_mem_gib": step_peak,
           "peak_gpu_mem_gib": max(step_peak, parts.startup.get("startup_peak_gpu_mem_gib", 0.0))}
    if parts.world_size > 1 and dist.is_available() and dist.is_initialized():
        both = torch.tensor([out["step_peak_gpu_mem_gib"], out["peak_gpu_mem_gib"]], device=parts.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        out["step_peak_gpu_mem_gib_max"], out["peak_gpu_mem_gib_max"] = both.tolist()
    return out


def evaluation_metrics(parts: LoopParts, due: Due) -> dict:
    """Eval loss and validation images where due (both collectives under sharding: every rank calls)."""
    metrics: dict = {}
    if due.evaluate:
        ev = evaluate(parts)
        if ev is not None:
            metrics["eval_loss"] = ev
    if due.validate:
        metrics.update(parts.validate(parts.position.step))
    return metrics


def save_and_report(parts: LoopParts, metrics: dict, report: Report) -> None:
    """Gather LoRA + optimizer state (a collective when sharded), rank 0 writes the checkpoint folder,
    every rank reports (Ray Train persists rank 0's folder before the temp dir goes)."""
    lora_sd, optim_sd = parts.state_io.gather()
    with tempfile.TemporaryDirectory(prefix="flux_ray_ckpt_") as d:
        ckpt = None
        if parts.rank == 0:
            save_checkpoint(d, lora_sd=lora_sd, optim_sd=optim_sd, lr_scheduler=parts.lr_scheduler,
                            position=parts.position, extra={"metrics": metrics}, lora_init_sd=parts.lora_init)
            ckpt = d
        report(metrics, ckpt)
