"""Readable progress on the driver: one line per Ray Train report, and a closing summary.

    step    10/30  loss 0.4123  eval 0.4011  12.3 samples/s  ETA 0:00:41  [checkpoint]

The ETA comes from the wall time between reports on the driver (evaluation, validation and checkpoints
included), so it is what the user will wait. ``flux-ray status JOB`` finds these lines in a job's log by
``PROGRESS_LINE``.
"""
from __future__ import annotations

import re
import sys
import time
from datetime import timedelta

PROGRESS_LINE = re.compile(r"^(trial \S+ +)?step +\d+/\d+ ")
SUMMARY_PREFIX = "done:"


def _eta(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(max(0.0, seconds))))


class ProgressPrinter:
    """A report handler ``(metrics, checkpoint_path)`` printing one line per report."""

    def __init__(self, total_steps: int, out=None, clock=time.monotonic):
        self.total, self.out, self.clock = total_steps, out, clock
        self._first: tuple[int, float] | None = None
        self.last: dict = {}
        self.eval_loss: float | None = None

    def __call__(self, metrics: dict, checkpoint_path: str | None = None) -> None:
        print(self.line(metrics, checkpoint_path), file=self.out or sys.stdout, flush=True)

    def line(self, metrics: dict, checkpoint_path: str | None = None) -> str:
        step, now = int(metrics.get("step", 0)), self.clock()
        if self._first is None:
            self._first = (step, now)
            per_step = metrics.get("step_time_s")
        else:
            s0, t0 = self._first
            per_step = (now - t0) / (step - s0) if step > s0 else metrics.get("step_time_s")
        self.last = metrics
        if metrics.get("eval_loss") is not None:
            self.eval_loss = metrics["eval_loss"]
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}"]
        if metrics.get("train_loss") is not None:
            parts.append(f"loss {metrics['train_loss']:.4f}")
        if metrics.get("eval_loss") is not None:
            parts.append(f"eval {metrics['eval_loss']:.4f}")
        if metrics.get("samples_per_s"):
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        parts.append(f"ETA {_eta(per_step * (self.total - step) if per_step is not None else None)}")
        tags = [t for t, on in (("checkpoint", checkpoint_path), ("validation", metrics.get("validation_grid"))) if on]
        return "  ".join(parts) + "".join(f"  [{t}]" for t in tags)


def summary_line(summary: dict) -> str:
    """The closing line: steps, losses, time, where the LoRA went."""
    parts = [f"{summary.get('steps')} steps"]
    if summary.get("final_loss") is not None:
        parts.append(f"loss {summary['final_loss']:.4f}")
    if summary.get("eval_loss") is not None:
        parts.append(f"eval {summary['eval_loss']:.4f}")
    if summary.get("seconds") is not None:
        parts.append(f"in {_eta(summary['seconds'])}")
    return f"{SUMMARY_PREFIX} " + "  ".join(parts)
