"""LoRA on the Flux transformer with PEFT: target presets, attach, state dicts in diffusers format."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq"}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def matching_modules(model: torch.nn.Module, target: str) -> list[str]:
    """Linear module names that PEFT's suffix match selects for one target string."""
    return [n for n, m in model.named_modules()
            if (n == target or n.endswith("." + target)) and isinstance(m, torch.nn.Linear)]


def resolve_targets(model: torch.nn.Module, lora_spec) -> list[str]:
    """The spec's target list, checked against the model: every target must match a module."""
    targets = lora_spec.target_modules
    missing = [t for t in targets if not matching_modules(model, t)]
    if missing:
        what = ("lora.peft_lora_target_modules" if lora_spec.peft_lora_target_modules
                else f"lora.flux_lora_target={lora_spec.flux_lora_target!r}")
        n_double = len(getattr(model, "transformer_blocks", []))
        n_single = len(getattr(model, "single_transformer_blocks", []))
        raise ValueError(f"{what} names modules this transformer lacks: {missing} "
                         f"(it has {n_double} double and {n_single} single blocks)")
    # A suffix that also names a non-Linear module (FLUX.2's attn.to_out: a ModuleList in double blocks, a Linear
    # in single blocks) would make PEFT try to wrap that module: it becomes its exact Linear names.
    out = []
    for t in targets:
        ambiguous = any((n == t or n.endswith("." + t)) and not isinstance(m, torch.nn.Linear)
                        for n, m in model.named_modules())
        out.extend(matching_modules(model, t) if ambiguous else [t])
    return out


def lora_config(lora_spec, targets: list[str]):
    from peft import LoraConfig

    kwargs = {}
    if lora_spec.lora_init_type == "loftq":
        from peft import LoftQConfig

        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(r=lora_spec.lora_rank, lora_alpha=lora_spec.alpha, lora_dropout=lora_spec.lora_dropout,
                      init_lora_weights=PEFT_INIT[lora_spec.lora_init_type], target_modules=targets, **kwargs)


def add_lora(transformer: torch.nn.Module, lora_spec, param_dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Attach a trainable LoRA adapter ("default"); returns its parameters (kept in param_dtype)."""
    targets = resolve_targets(transformer, lora_spec)
    if lora_spec.lora_init_type == "loftq" and next(transformer.parameters()).device.type != "cuda":
        raise ValueError("lora.lora_init_type='loftq' quantizes the base on a CUDA device (PEFT's LoftQ); "
                         "this worker runs on CPU: use default, gaussian, pissa or olora")
    transformer.add_adapter(lora_config(lora_spec, targets))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.to(param_dtype)
    if lora_spec.init_lora:
        load_lora_weights_into(transformer, lora_spec.init_lora)
    return params


def peft_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed as PEFT names them inside the transformer (no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def diffusers_state_dict(peft_sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT keys -> diffusers file keys (``transformer.<module>.lora_A.weight``)."""
    out = {}
    for k, v in peft_sd.items():
        k = k.removeprefix("base_model.model.")
        out["transformer." + k] = v.to(dtype) if dtype is not None else v
    return out


def lora_metadata(lora_spec, targets: list[str]) -> dict:
    """The LoRA config as diffusers writes it into safetensors metadata."""
    return {"r": lora_spec.lora_rank, "lora_alpha": lora_spec.alpha, "target_modules": sorted(targets),
            "lora_dropout": lora_spec.lora_dropout, "use_dora": False, "bias": "none"}


def save_diffusers_lora(directory: str | os.PathLike, peft_sd: dict[str, torch.Tensor], lora_spec,
                        extra_metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as FluxPipeline.save_lora_weights does (atomically)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    packed = {f"transformer.{k}": v for k, v in lora_metadata(lora_spec, lora_spec.target_modules).items()}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
    for k, v in (extra_metadata or {}).items():
        meta[f"flux_ray.{k}"] = v if isinstance(v, str) else json.dumps(v)
    path = directory / LORA_WEIGHT_NAME
    tmp = directory / (LORA_WEIGHT_NAME + ".tmp")
    save_file(diffusers_state_dict(peft_sd, dtype), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_lora_weights_into(transformer: torch.nn.Module, path: str) -> None:
    """Load a diffusers-format LoRA file into the transformer's existing "default" adapter."""
    from diffusers import FluxPipeline
    from peft import set_peft_model_state_dict

    sd = FluxPipeline.lora_state_dict(path)
    sd = sd[0] if isinstance(sd, tuple) else sd
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, sd, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"lora.init_lora {path!r}: keys do not fit this adapter's targets/rank: {unexpected[:5]}")


def moves_base_weights(lora_spec) -> bool:
    """PiSSA, OLoRA and LoftQ initialise by rewriting the base weights (W_res = W - B0 A0, or quantized)."""
    return lora_spec.lora_init_type in ("pissa", "olora", "loftq")


def to_standard_lora(peft_sd: dict[str, torch.Tensor], init_sd: dict[str, torch.Tensor], lora_spec):
    """A LoRA trained on moved base weights -> a standard LoRA on the original base.

    W_res + B A = W + (B A - B0 A0): a rank-2r LoRA with A' = [A; A0], B' = [B, -B0] and alpha 2*alpha,
    so the scale alpha/r is unchanged (what PEFT's path_initial_model_for_weight_conversion does).
    Returns (state dict, LoraSpec with the doubled rank and alpha).
    """
    out = {}
    for key, a in peft_sd.items():
        if ".lora_A." not in key:
            continue
        bkey = key.replace(".lora_A.", ".lora_B.")
        out[key] = torch.cat([a, init_sd[key]], dim=0)
        out[bkey] = torch.cat([peft_sd[bkey], -init_sd[bkey]], dim=1)
    spec = lora_spec.model_copy(update={"lora_rank": 2 * lora_spec.lora_rank, "lora_alpha": 2 * lora_spec.alpha,
                                        "lora_init_type": "default"})
    return out, spec
