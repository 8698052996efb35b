"""Gathering and restoring LoRA + optimizer state, plain/DDP or FSDP2-sharded. No Ray import."""
from __future__ import annotations

import torch

from flux_ray.core import lora as L

ADAPTER = ".default"


class StateIO:
    """``gather()`` is a collective under FSDP: every rank calls it; rank 0 writes the result."""

    def __init__(self, model: torch.nn.Module, transformer: torch.nn.Module, optimizer, sharded: bool):
        self.model, self.transformer, self.optimizer, self.sharded = model, transformer, optimizer, sharded

    def gather(self) -> tuple[dict[str, torch.Tensor], dict]:
        if not self.sharded:
            return L.peft_state_dict(self.transformer), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=opts)
        lora = {k.replace(ADAPTER + ".", "."): v.contiguous() for k, v in full.items() if ".lora_" in k}
        return lora, get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def restore(self, lora_sd: dict[str, torch.Tensor], optim_sd: dict) -> None:
        if not self.sharded:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.transformer, lora_sd, adapter_name="default")
            self.optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        named = {k.replace(".lora_A.", f".lora_A{ADAPTER}.").replace(".lora_B.", f".lora_B{ADAPTER}."): v
                 for k, v in lora_sd.items()}
        set_model_state_dict(self.model, named, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=optim_sd, options=opts)
