"""A one-worker sweep trial trained in its Tune actor's own process, so the next trial can reuse its model.

With ``tune.reuse_actors`` (the default for one-worker trials) the trainable holds the worker's resources and
runs the worker's loop itself (train/worker_loop.py), and Tune keeps the actor for the next trial
(``TuneConfig(reuse_actors=True)``): the process's train/base_cache.py still holds the loaded, adapter-wrapped,
compiled transformer, so a later trial with the same model skips the load and the compile.

Reports go where a Train run's go through MlflowReportCallback and TrialReportCallback: every one to MLflow,
those that carry the sweep metric (the last one held back: ASHA stops a trial at max_t) to Tune, with the
newest checkpoint. The trial's run directory is Tune's trial directory: Tune's checkpoint_NNNNNN folders,
lora/, run_summary.json; a restored sweep resumes the trial from ``ray.tune.get_checkpoint()``.

Tune runs each trial's function in a new thread; the model's training runs in one thread the process keeps for
every trial (``in_trainer_thread``): torch keeps CUDA graph trees, the current device and stream per thread, so a
reused trial steps the compiled model's recorded graphs from the thread that recorded them, and no thread that
owned them exits between trials.
"""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from flux_ray import storage
from flux_ray.tune.trial import SweepContext, finish_trial, goes_to_tune, start_trial, tune_metrics


class TrialReporter:
    """The loop's ``report(metrics, checkpoint_dir)`` in a trial: MLflow, then Tune.

    A checkpoint whose report lacks the sweep metric cannot go to Tune on its own (Tune requires the metric in
    every result): a copy waits here and goes with the next report that has it. The last step's checkpoint
    stays here for the export and the final report.
    """

    def __init__(self, ctx: SweepContext, run_id: str, extra: dict, last_step: int):
        self.ctx, self.run_id, self.extra, self.last_step = ctx, run_id, extra, last_step
        self.tmp = tempfile.mkdtemp(prefix="flux_ray_trial_")
        self.pending: str | None = None  # a local checkpoint folder not yet handed to Tune
        self.last: dict = {}

    def __call__(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        from flux_ray.tracking.ray_callback import log_report

        log_report(self.ctx.tracking_uri, self.run_id, metrics, self.ctx.storage)  # first: Tune may stop us
        self.last = metrics
        if not goes_to_tune(metrics, self.ctx.metric, self.last_step):
            if checkpoint_dir:  # the loop deletes its folder once we return: keep its files for later
                self._hold(checkpoint_dir, metrics["step"])
            return
        held, self.pending = self.pending, None
        newest = checkpoint_dir or held  # this report's own checkpoint supersedes a held, older one
        ckpt = ray.tune.Checkpoint.from_directory(newest) if newest else None
        try:
            ray.tune.report(tune_metrics(metrics, self.ctx.metric, self.ctx.mode, self.extra), checkpoint=ckpt)
        finally:
            if held:  # persisted to the trial's directory by now (or superseded, or the trial was stopped)
                shutil.rmtree(held, ignore_errors=True)

    def _hold(self, checkpoint_dir: str, step: int) -> None:
        """Take the checkpoint's files (renames: the loop removes its emptied folder when we return)."""
        if self.pending:
            shutil.rmtree(self.pending, ignore_errors=True)
        self.pending = os.path.join(self.tmp, f"step_{step}")
        os.makedirs(self.pending)
        for name in os.listdir(checkpoint_dir):
            shutil.move(os.path.join(checkpoint_dir, name), os.path.join(self.pending, name))

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_local_trial(config: dict, *, base_spec: dict, ctx: SweepContext) -> None:
    """Tune function trainable: sampled {dotted key: value} -> the trial's spec trained in this process."""
    import ray.tune

    from flux_ray.train.checkpoint import checkpoint_metrics
    from flux_ray.train.driver import TrainOutcome, export_final_lora
    from flux_ray.train.worker_loop import run_worker

    t0 = time.time()
    spec, trial_id, run_id, extra = start_trial(config, base_spec, ctx)
    reporter = TrialReporter(ctx, run_id, extra, spec.train.max_train_steps)
    restored = ray.tune.get_checkpoint()

    def train() -> int:
        device = trial_device(spec)
        run_worker(spec, device, 0, 1, checkpoint=restored, report=reporter, reuse_base=True, started_at=t0,
                   wrap=lambda m: m if spec.model.enable_group_offload else m.to(device))
        return threading.get_native_id()

    try:
        trainer = in_trainer_thread(train)
        final_dir, metrics = reporter.pending, reporter.last
        if final_dir is None:  # resumed at the last step: nothing left to train
            final_dir = shutil.copytree(restored.to_directory(), os.path.join(reporter.tmp, "restored"))
            metrics = checkpoint_metrics(final_dir)
        outcome = TrainOutcome(run_uri=spec.run_uri, lora_uri=export_final_lora(spec, final_dir, metrics),
                               checkpoint_uri=storage.join(spec.run_uri, next_checkpoint_name()),
                               steps=int(metrics.get("step", 0)), final_loss=metrics.get("train_loss"),
                               eval_loss=metrics.get("eval_loss"), metrics=metrics)
        final = finish_trial(spec, ctx, config, trial_id, run_id, outcome, t0)
        final.update(trainer_thread=trainer, trial_thread=threading.get_native_id())  # kernel ids: never reused soon
        ray.tune.report(final, checkpoint=ray.tune.Checkpoint.from_directory(final_dir))  # must come last
    finally:
        reporter.close()


class _TrainerThread:
    """One daemon thread that runs the functions handed to it, one at a time, for the life of the process."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="flux_ray_trainer", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            fn, future = self.jobs.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # SystemExit too: Tune's report ends a stopped trial with it
                future.set_exception(e)
            del fn, future

    def run(self, fn):
        future: Future = Future()
        self.jobs.put((fn, future))
        return future.result()


_trainer: _TrainerThread | None = None
_trainer_lock = threading.Lock()


def in_trainer_thread(fn):
    """``fn()`` in the process's trainer thread (started on first use); returns its result or raises its error."""
    global _trainer
    with _trainer_lock:
        if _trainer is None:
            _trainer = _TrainerThread()
    return _trainer.run(fn)


def trial_device(spec) -> torch.device:
    """The trial's GPU (Ray set CUDA_VISIBLE_DEVICES to the one it holds), or the CPU."""
    if not spec.scaling.use_gpu:
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def next_checkpoint_name() -> str:
    """The folder Tune gives the next reported checkpoint: ``checkpoint_NNNNNN``, one past the newest this trial
    reported or resumed from (Ray's StorageContext numbering)."""
    import ray.tune

    last = ray.tune.get_checkpoint()
    index = int(Path(last.path).name.rsplit("_", 1)[1]) + 1 if last is not None else 0
    return f"checkpoint_{index:06d}"
