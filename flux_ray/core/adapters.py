"""The trainable adapter on the frozen transformer: PEFT LoRA or LyCORIS (LoKr ...), behind one interface."""
from __future__ import annotations

import contextlib

import torch

from flux_ray.core import lora

LYCORIS_FLUX_PRESET = {"target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock"]}


class PeftAdapter:
    kind = "peft"

    def __init__(self, transformer: torch.nn.Module, lora_spec):
        self.transformer = transformer
        self.params = lora.add_lora(transformer, lora_spec)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return lora.peft_state_dict(self.transformer)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.transformer, sd, adapter_name="default")


class LycorisAdapter:
    """A LyCORIS network (``lora.lycoris_config``: algo, factor, linear_dim, ...) applied to the blocks."""
    kind = "lycoris"

    def __init__(self, transformer: torch.nn.Module, lora_spec):
        from lycoris import LycorisNetwork, create_lycoris

        cfg = dict(lora_spec.lycoris_config)
        LycorisNetwork.apply_preset(cfg.pop("apply_preset", LYCORIS_FLUX_PRESET))
        multiplier = cfg.pop("multiplier", 1.0)
        self.net = create_lycoris(transformer, multiplier, cfg.pop("linear_dim", lora_spec.lora_rank),
                                  cfg.pop("linear_alpha", lora_spec.alpha), algo=cfg.pop("algo", "lokr"), **cfg)
        self.net.apply_to()
        self.net.to(next(transformer.parameters()).device)
        # Registered on the transformer so DDP syncs its gradients and .parameters() finds it.
        transformer.add_module("lycoris_network", self.net)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()
        if not self.params:
            raise ValueError("lora.lycoris_config matched no modules of this transformer")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(sd)


def attach_adapter(transformer: torch.nn.Module, lora_spec):
    return LycorisAdapter(transformer, lora_spec) if lora_spec.lora_type == "lycoris" else PeftAdapter(transformer, lora_spec)



class AdapterSwitch:
    """Turns every adapter of a model off for a ``with`` block: the frozen base alone. PEFT LoRA layers are
    bypassed (what PEFT's ``disable_adapter()`` context does, without its ``requires_grad`` toggling, which DDP
    and FSDP must not see); LyCORIS networks run at multiplier 0. The layers are found once."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.peft_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        self.lycoris = [m for m in model.modules() if hasattr(m, "set_multiplier") and hasattr(m, "loras")]
        if not self.peft_layers and not self.lycoris:
            raise ValueError("the model has no adapter to turn off")

    @contextlib.contextmanager
    def off(self):
        before = [m._disable_adapters for m in self.peft_layers], [m.multiplier for m in self.lycoris]
        try:
            for m in self.peft_layers:
                m._disable_adapters = True
            for m in self.lycoris:
                m.set_multiplier(0.0)
            yield
        finally:
            for m, b in zip(self.peft_layers, before[0]):
                m._disable_adapters = b
            for m, b in zip(self.lycoris, before[1]):
                m.set_multiplier(b)
