"""Gathering and restoring LoRA + optimizer state, plain/DDP or FSDP2-sharded. No Ray import."""
from __future__ import annotations

import torch

ADAPTER = ".default"


class StateIO:
    """``gather()`` is a collective under FSDP: every rank calls it; rank 0 writes the result."""

    def __init__(self, model: torch.nn.Module, adapter, optimizer, sharded: bool, optimizer_state: bool = True):
        self.model, self.adapter, self.optimizer, self.sharded = model, adapter, optimizer, sharded
        # DeepSpeed ZeRO partitions optimizer state per rank: its checkpoints keep LoRA, scheduler and
        # position, and the optimizer moments restart on resume.
        self.optimizer_state = optimizer_state

    def gather(self) -> tuple[dict[str, torch.Tensor], dict]:
        if not self.optimizer_state:
            return self.adapter.state_dict(), {}
        if not self.sharded:
            return self.adapter.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=opts)
        lora = {k.replace(ADAPTER + ".", "."): v.contiguous() for k, v in full.items() if ".lora_" in k}
        return lora, get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def restore(self, lora_sd: dict[str, torch.Tensor], optim_sd: dict) -> None:
        if not self.sharded:
            self.adapter.load_state_dict(lora_sd)
            if self.optimizer_state and optim_sd:
                self.optimizer.load_state_dict(optim_sd)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, strict=False)
        named = {k.replace(".lora_A.", f".lora_A{ADAPTER}.").replace(".lora_B.", f".lora_B{ADAPTER}."): v
                 for k, v in lora_sd.items()}
        set_model_state_dict(self.model, named, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=optim_sd, options=opts)
