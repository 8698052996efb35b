"""Opt-in per-rank step profile, for finding what limits multi-GPU scaling. No Ray import.

Set ``FLUX_RAY_PROFILE_STEPS=START,COUNT`` and ``FLUX_RAY_PROFILE_DIR=/path`` in the workers' environment
(``runtime_env`` env_vars, or the driver's environment on a local cluster). Steps START..START+COUNT-1 are
recorded with ``torch.profiler`` on every rank and each rank writes ``rank<r>.json``: wall seconds per step,
host seconds per step spent assembling batches, and device kernel milliseconds per step by kind (gemm,
attention, nccl, optimizer, triton, other). On N GPUs, NCCL kernel time includes waiting for the slowest rank, so
``nccl`` growing while ``gemm`` and ``attention`` stay put is rank skew or communication, and wall time
well above the kernel total is the host.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

BATCH_RANGE = "flux_ray.batch"


# GPU kernel kinds by name fragment, first match wins (also bench/train_step_bench.py's profile=1).
KERNEL_KINDS = (("nccl", ("nccl",)),
                ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "cublas", "splitk", "matmul")),
                ("optimizer", ("multi_tensor", "fused_adam", "adam", "foreach")),
                ("triton", ("triton_",)))


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name: nccl, attention, gemm, optimizer, triton (inductor's) or other."""
    n = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in n for p in parts)), "other")


class StepProfiler:
    """Profile a window of training steps; ``after_step(step)`` is called by the loop after each step."""

    def __init__(self, start: int, count: int, out_dir: str, rank: int, device: torch.device):
        self.start, self.count, self.out_dir, self.rank, self.device = start, count, Path(out_dir), rank, device
        self.prof, self.t0 = None, 0.0

    @classmethod
    def from_env(cls, rank: int, device: torch.device) -> "StepProfiler | None":
        steps, out = os.environ.get("FLUX_RAY_PROFILE_STEPS"), os.environ.get("FLUX_RAY_PROFILE_DIR")
        if not steps or not out:
            return None
        try:
            start, count = (int(x) for x in steps.split(","))
        except ValueError:
            raise ValueError(f"FLUX_RAY_PROFILE_STEPS={steps!r}: expected START,COUNT (two integers)") from None
        if start < 2 or count < 1:
            raise ValueError(f"FLUX_RAY_PROFILE_STEPS={steps!r}: START must be >= 2 (the first step compiles "
                             "and warms up) and COUNT >= 1")
        return cls(start, count, out, rank, device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def after_step(self, step: int) -> None:
        """``step`` steps are done; start recording before step ``start``, stop after ``start+count-1``."""
        if step == self.start - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and step == self.start + self.count - 1:
            self._sync()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.write(self.summarize(self.prof, wall))
            self.prof = None

    def summarize(self, prof, wall: float) -> dict:
        kinds = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other"], 0.0)
        host_batch = 0.0
        for e in prof.events():
            if e.name == BATCH_RANGE and e.device_type == torch.autograd.DeviceType.CPU:
                host_batch += e.time_range.elapsed_us()
            elif e.device_type == torch.autograd.DeviceType.CUDA:  # kernels (and memcpys) on the device
                kinds[kernel_kind(e.name)] += e.time_range.elapsed_us()
        n = self.count
        out = {"rank": self.rank, "steps": [self.start, self.start + n - 1], "wall_s_per_step": round(wall / n, 4),
               "host_batch_ms_per_step": round(host_batch / 1e3 / n, 2),
               "kernel_ms_per_step": {k: round(v / 1e3 / n, 2) for k, v in kinds.items()}}
        out["kernel_ms_per_step"]["total"] = round(sum(kinds.values()) / 1e3 / n, 2)
        top = sorted(prof.key_averages(), key=lambda a: a.self_device_time_total, reverse=True)[:12]
        out["top_ops_device_ms_per_step"] = {a.key[:80]: round(a.self_device_time_total / 1e3 / n, 2) for a in top
                                             if a.self_device_time_total > 0}
        return out

    def write(self, summary: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{self.rank}.json").write_text(json.dumps(summary, indent=1))
