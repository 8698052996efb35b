"""How a loss becomes an optimizer step: plain torch (single/DDP/FSDP2, or several unwrapped replicas averaged by one
flat all-reduce) or a DeepSpeed engine. No Ray."""
from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors

log = logging.getLogger("flux_ray.train")


class Stepper(Protocol):
    """Turns micro-batch losses into one optimizer step (train/loop.py's ``train_step`` calls it)."""

    def start(self) -> None:
        """Before the first step, after the build and any checkpoint restore (e.g. make the replicas equal)."""

    def micro_step(self, loss: torch.Tensor, micro: int, accum: int) -> None:
        """Backward of micro-batch ``micro`` of ``accum``."""

    def finish_step(self) -> None:
        """The optimizer and LR-scheduler step after the last micro-batch, gradients cleared."""


class TorchStepper:
    """backward per micro-batch (DDP sync only on the last), then clip, step, schedule, zero."""

    def __init__(self, model, params, optimizer, lr_scheduler, max_grad_norm: float):
        self.model, self.params, self.optimizer = model, params, optimizer
        self.lr_scheduler, self.max_grad_norm = lr_scheduler, max_grad_norm

    def start(self) -> None:
        pass

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


class FlatAllReduceStepper(TorchStepper):
    """Several workers without a DDP wrapper (``scaling.gradient_sync: allreduce``): each rank's backward stays
    local (no hooks, no collective inside it, where compiled blocks replay as CUDA graphs: DDP's gave no first
    report there, bench/RESULTS.md call 33); after the last micro-batch of a step one all-reduce averages every
    trainable gradient (:class:`FlatGradientSync`), then clip, step, schedule and zero as on one worker. Gradient
    accumulation needs no ``no_sync``: nothing is reduced before the step's boundary."""

    def __init__(self, model, params, optimizer, lr_scheduler, max_grad_norm: float):
        super().__init__(model, params, optimizer, lr_scheduler, max_grad_norm)
        self.sync = FlatGradientSync(params)

    def start(self) -> None:
        self.sync.broadcast_params()

    def finish_step(self) -> None:
        self.sync.all_reduce_grads()
        super().finish_step()


class FlatGradientSync:
    """What DDP does for the trainable parameters, as one collective per step, outside autograd.

    ``broadcast_params``: rank 0's trainable (LoRA) parameters to every rank, as DDP does when it wraps. Only
    those: the frozen base (12 B parameters for FLUX.1) is loaded from the same files by every rank, and a LoRA
    init that rewrites it (PiSSA, OLoRA, LoftQ) runs under the same seed on each, so its broadcast would move
    tens of GB to change nothing.

    ``all_reduce_grads``: the trainable gradients are copied into one persistent flat buffer (allocated once, per
    dtype and device: the trainable weights share one, so one buffer and one ``all_reduce`` in practice), summed,
    divided by the world size and copied back. The buffer ends with one flag per parameter, 1 where this rank
    has a gradient: a parameter without one counts as zeros, gets the average where another rank had a gradient,
    and stays None where no rank had one (the optimizer skips it, as under DDP). The flags are read back (a host
    sync) only on a rank that lacked some gradient."""

    def __init__(self, params: list[torch.nn.Parameter]):
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.buckets = [_FlatBucket(ps) for ps in groups.values()]
        self.world_size = dist.get_world_size()

    @torch.no_grad()
    def broadcast_params(self, src: int = 0) -> None:
        for b in self.buckets:
            torch._foreach_copy_(b.views, [p.detach() for p in b.params])
            dist.broadcast(b.values, src=src)
            torch._foreach_copy_([p.detach() for p in b.params], b.views)

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        for b in self.buckets:
            have, lacking = b.pack()
            dist.all_reduce(b.flat)
            b.flat.div_(self.world_size)
            b.unpack(have, lacking)


class _FlatBucket:
    """Trainable parameters of one dtype and device, and their flat buffer: values (gradients, or the weights
    for the broadcast), then one has-a-gradient flag per parameter."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        n = sum(p.numel() for p in params)
        self.flat = torch.zeros(n + len(params), dtype=params[0].dtype, device=params[0].device)
        self.values, self.flags = self.flat[:n], self.flat[n:]
        self.views = list(_unflatten_dense_tensors(self.values, params))  # each a view of the buffer

    def pack(self) -> tuple[list[int], list[int]]:
        """Gradients (zeros where None) and flags into the buffer; returns the indices of the params with a
        gradient and of those without."""
        have, lacking = [], []
        for i, p in enumerate(self.params):
            (lacking if p.grad is None else have).append(i)
        if have:
            torch._foreach_copy_([self.views[i] for i in have], [self.params[i].grad for i in have])
        if lacking:
            torch._foreach_zero_([self.views[i] for i in lacking])
            flags = torch.ones(len(self.params), dtype=self.flat.dtype)
            flags[lacking] = 0
            self.flags.copy_(flags)
        else:
            self.flags.fill_(1)  # the usual case: no host-to-device copy
        return have, lacking

    def unpack(self, have: list[int], lacking: list[int]) -> None:
        """The averaged gradients back; a param that lacked one gets it where some rank had one."""
        if have:
            torch._foreach_copy_([self.params[i].grad for i in have], [self.views[i] for i in have])
        if lacking:
            used = self.flags.tolist()
            for i in lacking:
                if used[i] > 0:
                    self.params[i].grad = self.views[i].clone()


class DeepSpeedStepper:
    """DeepSpeed counts micro-batches itself: backward + step per micro-batch, it steps at the boundary."""

    def __init__(self, engine):
        self.engine = engine

    def start(self) -> None:
        pass  # deepspeed.initialize broadcast the model

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
