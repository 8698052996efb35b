"""How a loss becomes an optimizer step: plain torch (single/DDP/FSDP2) or a DeepSpeed engine. No Ray."""
from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import torch

log = logging.getLogger("flux_ray.train")


class Stepper(Protocol):
    """Turns micro-batch losses into one optimizer step (train/loop.py's ``train_step`` calls it)."""

    def micro_step(self, loss: torch.Tensor, micro: int, accum: int) -> None:
        """Backward of micro-batch ``micro`` of ``accum``."""

    def finish_step(self) -> None:
        """The optimizer and LR-scheduler step after the last micro-batch, gradients cleared."""


class TorchStepper:
    """backward per micro-batch (DDP sync only on the last), then clip, step, schedule, zero."""

    def __init__(self, model, params, optimizer, lr_scheduler, max_grad_norm: float):
        self.model, self.params, self.optimizer = model, params, optimizer
        self.lr_scheduler, self.max_grad_norm = lr_scheduler, max_grad_norm

    def micro_step(self, loss: torch.Tensor, micro: int, accum: int) -> None:
        last = micro == accum - 1
        ctx = self.model.no_sync() if hasattr(self.model, "no_sync") and not last else contextlib.nullcontext()
        with ctx:
            (loss / accum).backward()

    def finish_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedStepper:
    """DeepSpeed counts micro-batches itself: backward + step per micro-batch, it steps at the boundary."""

    def __init__(self, engine):
        self.engine = engine

    def micro_step(self, loss: torch.Tensor, micro: int, accum: int) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def finish_step(self) -> None:
        pass


def deepspeed_config(spec, device: torch.device) -> dict:
    """The spec's DeepSpeed config with batch, accumulation, clipping and precision filled in from train.*."""
    cfg = dict(spec.scaling.deepspeed_config or {"zero_optimization": {"stage": 2}})
    cfg.setdefault("train_micro_batch_size_per_gpu", spec.train.train_batch_size)
    cfg.setdefault("gradient_accumulation_steps", spec.train.gradient_accumulation_steps)
    cfg.setdefault("gradient_clipping", spec.train.max_grad_norm)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("bf16", {"enabled": device.type == "cuda" and spec.train.mixed_precision == "bf16"})
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def init_deepspeed(spec, transformer, params, optimizer, lr_scheduler, device: torch.device):
    """Wrap the LoRA transformer in a DeepSpeed engine (ZeRO stage from the spec's config)."""
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=transformer, model_parameters=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
        config=deepspeed_config(spec, device))
    return engine, optimizer, lr_scheduler
