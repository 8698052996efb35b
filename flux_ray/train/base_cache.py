"""A process-level cache of the prepared transformer, so that the next sweep trial in a reused Tune actor skips
the load, the adapter attach and the compile. No Ray import.

An entry holds the loaded base with its adapter attached, TREAD hooks, the device copy and compiled blocks,
plus the adapter's initial weights and the RNG state right after that build. A later build with the same key
(everything that shapes those objects: model, LoRA, the train keys that touch the model, the seed, the device)
copies the initial weights back and restores the RNG: its losses equal a fresh build's. Dynamo's graphs stay
valid because the module objects are the same (parameters are graph inputs). Another key drops the entry
first, so its GPU memory is free before the next load.
"""
from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flux_ray.spec import JobSpec

TRAIN_KEYS_NOT_IN_MODEL = frozenset({
    "max_train_steps", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "adam_beta1",
    "adam_beta2", "adam_weight_decay", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "max_grad_norm",
    "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "log_every"})
"""Train keys a reused model may differ in: the optimizer, scheduler and loop cadence are built per trial.
Any other train key (compile, checkpointing, TREAD, seed ...) is part of the key."""


@dataclass
class CachedBase:
    """The objects a build made once, and what a reuse restores."""
    key: str
    transformer: torch.nn.Module      # the unwrapped transformer with its adapter
    model: torch.nn.Module            # what the loop steps (wrapped and compiled)
    adapter: Any
    lora_init: dict | None
    tread: Any
    initial: list[torch.Tensor] = field(default_factory=list)   # trainable weights as built
    rng: dict = field(default_factory=dict)                     # torch RNG states right after the build

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def snapshot(self, device: torch.device) -> None:
        self.initial = [p.detach().clone() for p in self.trainable()]
        self.rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            self.rng["cuda"] = torch.cuda.get_rng_state(device)

    def restore(self, device: torch.device) -> None:
        """Back to the state right after the build: initial adapter weights, no grads, the same RNG."""
        with torch.no_grad():
            for p, init in zip(self.trainable(), self.initial, strict=True):
                p.copy_(init)
                p.grad = None
        self.model.train()
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state(self.rng["cuda"], device)


_entry: CachedBase | None = None


def base_key(spec: JobSpec, device: torch.device) -> str:
    """What defines the prepared transformer (see the module docstring)."""
    train = {k: v for k, v in spec.train.model_dump(mode="json").items() if k not in TRAIN_KEYS_NOT_IN_MODEL}
    if spec.train.optimizer != "adamw_bf16":  # the optimizer matters to the model only by the weights' dtype
        train.pop("optimizer")
    parts = {"model": spec.model.model_dump(mode="json"), "lora": spec.lora.model_dump(mode="json"), "train": train,
             "strategy": spec.scaling.strategy, "device": str(device)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def reusable(spec: JobSpec) -> bool:
    """PiSSA/OLoRA/LoftQ rewrite base weights at init, and DeepSpeed wraps the model per run: build afresh."""
    from flux_ray.core import lora

    return not lora.moves_base_weights(spec.lora) and spec.scaling.strategy != "deepspeed"


def take(spec: JobSpec, device: torch.device) -> CachedBase | None:
    """The cached build for this spec, restored to its initial state; None (and the cache emptied) otherwise."""
    key = base_key(spec, device) if reusable(spec) else None
    if _entry is not None and _entry.key == key:
        _entry.restore(device)
        return _entry
    drop()
    return None


def keep(entry: CachedBase, device: torch.device) -> None:
    """Cache a fresh build (call right after it, before anything else draws random numbers)."""
    global _entry
    entry.snapshot(device)
    _entry = entry


def drop() -> None:
    """Forget the cached build and give its memory back."""
    global _entry
    if _entry is None:
        return
    _entry = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
