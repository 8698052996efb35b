"""Optimizers and LR schedulers by their SimpleTuner names."""
from __future__ import annotations

import functools
import math

import torch


def cast_trainable_params(train_spec, params: list[torch.nn.Parameter]) -> None:
    """``adamw_bf16`` keeps the trainable weights (and so AdamW's moments) in bf16. Call it before DDP or FSDP
    wrap the model: DDP sizes its gradient buckets and FSDP2 its sharded parameters by the dtype they see."""
    if train_spec.optimizer == "adamw_bf16":
        for p in params:
            p.data = p.data.to(torch.bfloat16)


def build_optimizer(train_spec, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    name = train_spec.optimizer
    betas = (train_spec.adam_beta1, train_spec.adam_beta2)
    lr, wd = train_spec.learning_rate, train_spec.adam_weight_decay
    if name.startswith("bnb-"):
        if device.type != "cuda":
            raise ValueError(f"train.optimizer={name!r} needs a CUDA device (bitsandbytes 8-bit optimizers); "
                             "this worker runs on CPU: use adamw, or scaling.use_gpu: true")
        import bitsandbytes as bnb

        cls = {"bnb-adamw8bit": bnb.optim.AdamW8bit, "bnb-lion8bit": bnb.optim.Lion8bit,
               "bnb-lion8bit-paged": bnb.optim.PagedLion8bit}[name]
        return cls(params, lr=lr, betas=betas, weight_decay=wd)
    if name.startswith("optimi-"):
        try:
            import optimi
        except ImportError as e:
            raise ValueError(f"train.optimizer={name!r} needs the torch-optimi package (pip install torch-optimi)") from e
        cls = {"optimi-lion": optimi.Lion, "optimi-stableadamw": optimi.StableAdamW}[name]
        return cls(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw_bf16":
        assert all(p.dtype == torch.bfloat16 for p in params), "cast_trainable_params runs before wrapping"
    fused = device.type == "cuda" and name == "adamw"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd, fused=fused or None)


def build_lr_scheduler(train_spec, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler`` by name (``num_cycles`` from ``lr_num_cycles``), or SimpleTuner's ``sine``."""
    from diffusers.optimization import get_scheduler

    if train_spec.lr_scheduler == "sine":
        return sine_schedule(optimizer, train_spec.lr_warmup_steps)
    return get_scheduler(train_spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=train_spec.lr_warmup_steps,
                         num_training_steps=train_spec.max_train_steps, num_cycles=train_spec.lr_num_cycles)


def sine_lr_factor(step: int, period_steps: int) -> float:
    """SimpleTuner's ``Sine`` scheduler (lr_end 0): 0.5 * (1 + sin(pi * step / T_0)), T_0 = lr_warmup_steps."""
    return 0.5 * (1 + math.sin(math.pi * step / period_steps))


def sine_schedule(optimizer: torch.optim.Optimizer, period_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(sine_lr_factor, period_steps=period_steps))
