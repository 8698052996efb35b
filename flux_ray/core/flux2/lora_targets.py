"""LoRA target presets for ``Flux2Transformer2DModel``, named as SimpleTuner names them for FLUX.2.

Source: SimpleTuner ``simpletuner/helpers/models/flux2/model.py``, ``Flux2.get_lora_target_modules``
(presets ``all``, ``attention``, ``mlp``, ``tiny``; ``all`` is its fallback). ``diffusers`` is the default
of diffusers' ``train_dreambooth_lora_flux2{,_klein}.py`` (image-stream attention of the double
blocks, the fused projections of the single blocks) so its stock recipe can be reproduced.

FLUX.2 block layout (diffusers names): double blocks ``transformer_blocks.N`` have ``attn.to_q/k/v``,
``attn.to_out.0`` (image stream), ``attn.add_q/k/v_proj``, ``attn.to_add_out`` (text stream),
``ff.linear_in/out`` and ``ff_context.linear_in/out`` (SwiGLU); single blocks
``single_transformer_blocks.N`` have one fused ``attn.to_qkv_mlp_proj`` and ``attn.to_out``.
``attn.to_out`` names a ModuleList in double blocks and a Linear in single blocks, so presets are
resolved against the model into exact Linear module names before they reach PEFT.
"""
from __future__ import annotations

import torch

from flux_ray.spec import FLUX2_LORA_TARGET_PRESETS  # noqa: E402  (the spec validates preset names)

DEFAULT_FLUX2_LORA_TARGET = "all"


def linear_modules_matching(model: torch.nn.Module, suffix: str) -> list[str]:
    """Names of Linear modules equal to ``suffix`` or ending in ``.suffix`` (PEFT's match, Linear only)."""
    return [n for n, m in model.named_modules()
            if (n == suffix or n.endswith("." + suffix)) and isinstance(m, torch.nn.Linear)]


def resolve_targets(transformer: torch.nn.Module, preset: str | None = None,
                    modules: list[str] | None = None) -> list[str]:
    """A preset (or explicit suffixes) -> the sorted exact Linear module names it selects.

    Every suffix must select at least one Linear, so a typo or a FLUX.1 name fails here.
    """
    if modules is None:
        if preset not in FLUX2_LORA_TARGET_PRESETS:
            raise ValueError(f"unknown FLUX.2 LoRA target preset {preset!r}; "
                             f"choose one of {sorted(FLUX2_LORA_TARGET_PRESETS)}")
        modules = FLUX2_LORA_TARGET_PRESETS[preset]
    found, missing = set(), []
    for suffix in modules:
        names = linear_modules_matching(transformer, suffix)
        if not names:
            missing.append(suffix)
        found.update(names)
    if missing:
        raise ValueError(f"LoRA targets {missing} match no Linear in this FLUX.2 transformer "
                         f"(it has {len(transformer.transformer_blocks)} double and "
                         f"{len(transformer.single_transformer_blocks)} single blocks)")
    return sorted(found)
