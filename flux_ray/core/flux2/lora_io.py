"""FLUX.2 LoRA files in diffusers format: what ``Flux2Pipeline.save_lora_weights`` writes and
``Flux2Pipeline`` / ``Flux2KleinPipeline.load_lora_weights`` read.

Keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (the same layout as FLUX.1's, so
``core.lora.diffusers_state_dict`` builds them) and the adapter config under ``lora_adapter_metadata``
in the safetensors header, which diffusers uses to rebuild the PEFT config (rank, alpha, targets).
ComfyUI reads this diffusers layout directly (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet`` maps
``transformer.*`` keys of Flux and its subclass Flux2 through ``comfy/utils.py`` ``flux_to_diffusers``; SimpleTuner
marks FLUX.2 ``NATIVE_COMFYUI_LORA_SUPPORT``), so no separate ComfyUI layout is written for FLUX.2.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from flux_ray.core.lora import LORA_WEIGHT_NAME, diffusers_state_dict


def adapter_metadata(rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0) -> dict[str, str]:
    """The safetensors header diffusers' ``save_lora_weights`` writes for a transformer-only LoRA."""
    cfg = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules), "lora_dropout": dropout,
           "use_dora": False, "bias": "none"}
    packed = {f"transformer.{k}": v for k, v in cfg.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def save_flux2_lora(directory: str | os.PathLike, peft_sd: dict[str, torch.Tensor], *, rank: int, alpha: float,
                    target_modules: list[str], dtype: torch.dtype | None = None,
                    extra_metadata: dict | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (atomically) from a PEFT state dict of the transformer."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = adapter_metadata(rank, alpha, target_modules)
    for k, v in (extra_metadata or {}).items():
        meta[f"flux_ray.{k}"] = v if isinstance(v, str) else json.dumps(v)
    path, tmp = directory / LORA_WEIGHT_NAME, directory / (LORA_WEIGHT_NAME + ".tmp")
    save_file(diffusers_state_dict(peft_sd, dtype), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
