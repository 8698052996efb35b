"""Flux's diffusers module names vs Black Forest Labs' original layout, and LoRAs moved between them.

BFL's Flux (black-forest-labs/flux, src/flux/model.py and modules/layers.py) is what ComfyUI and
kohya sd-scripts load. It fuses modules that diffusers keeps apart:

- double block ``img_attn.qkv`` = [to_q; to_k; to_v], ``txt_attn.qkv`` = [add_q_proj; add_k_proj; add_v_proj]
- single block ``linear1`` = [to_q; to_k; to_v; proj_mlp] (output rows 3 x hidden, then 4 x hidden)

Split order and names follow diffusers' own converters in
``diffusers/loaders/lora_conversion_utils.py`` (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_bfl_flux_control_lora_to_diffusers``), which map the other way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DOUBLE_BLOCK = {  # module under transformer_blocks.{i} -> (module under double_blocks.{i}, part)
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
SINGLE_BLOCK = {  # module under single_transformer_blocks.{i} -> (module under single_blocks.{i}, part)
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
TOP_LEVEL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
FUSED_PART_ROWS = {"qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
"""Output rows of each part of a fused BFL module, in units of the hidden size (mlp_ratio is 4)."""

SCALE_SHIFT_SWAPPED = {"final_layer.adaLN_modulation.1"}
"""BFL emits (shift, scale) where diffusers' AdaLayerNormContinuous emits (scale, shift)."""

ALPHA_IGNORED_BY_DIFFUSERS = {"final_layer.linear", "final_layer.adaLN_modulation.1"}
"""diffusers' kohya converter loads these without reading their ``.alpha`` (scale taken as 1)."""

_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class BflTarget:
    module: str
    """BFL module name, e.g. ``double_blocks.3.img_attn.qkv``."""
    part: int | None = None
    """Index of this diffusers module's rows inside a fused BFL module; None when not fused."""

    @property
    def part_rows(self) -> tuple[int, ...]:
        return FUSED_PART_ROWS[self.module.rsplit(".", 1)[-1]] if self.part is not None else (1,)


def to_bfl(module: str) -> BflTarget:
    """diffusers module name inside FluxTransformer2DModel -> its place in BFL's Flux."""
    if module in TOP_LEVEL:
        return BflTarget(TOP_LEVEL[module])
    for pattern, table, bfl_prefix in ((_DOUBLE, DOUBLE_BLOCK, "double_blocks"),
                                       (_SINGLE, SINGLE_BLOCK, "single_blocks")):
        m = pattern.match(module)
        if m and m.group(2) in table:
            name, part = table[m.group(2)]
            return BflTarget(f"{bfl_prefix}.{m.group(1)}.{name}", part)
    raise ValueError(f"no BFL counterpart known for LoRA module {module!r}")


def kohya_name(bfl_module: str) -> str:
    """sd-scripts naming: ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return "lora_unet_" + bfl_module.replace(".", "_")


def comfyui_name(bfl_module: str) -> str:
    """ComfyUI's own naming (its LoRA save/extract nodes): ``diffusion_model.double_blocks.0.img_attn.qkv``."""
    return "diffusion_model." + bfl_module


def bfl_state_dict(lora: dict, fmt: str) -> dict[str, torch.Tensor]:
    """{diffusers module: LoraWeights} -> lora_down/lora_up/alpha tensors on BFL's layout, named for ``fmt``.

    See flux_ray.core.lora_export for the fusing and alpha rules.
    """
    namer = {"kohya": kohya_name, "comfyui": comfyui_name}[fmt]
    groups: dict[str, dict] = {}
    part_rows: dict[str, tuple[int, ...]] = {}
    for name, w in lora.items():
        target = to_bfl(name)
        groups.setdefault(target.module, {})[target.part] = w
        part_rows[target.module] = target.part_rows
    out = {}
    for module, parts in sorted(groups.items()):
        if set(parts) == {None}:
            down, up, scale = parts[None].down, parts[None].up, parts[None].scale
        else:
            down, up, scale = _fuse(module, parts, part_rows[module])
        if module in SCALE_SHIFT_SWAPPED:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        alpha = scale * down.shape[0]
        if module in ALPHA_IGNORED_BY_DIFFUSERS:
            up, alpha = (up.float() * scale).to(up.dtype), float(down.shape[0])
        key = namer(module)
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _fuse(module: str, parts: dict, rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Stack downs, place ups block-diagonally; absent parts get zero blocks of the same rank."""
    if None in parts:
        raise ValueError(f"{module}: a fused module cannot also hold an unfused LoRA")
    first = parts[min(parts)]
    hidden, dtype = first.down.shape[1], first.down.dtype
    downs, ups = [], []
    for i, mult in enumerate(rows):
        w = parts.get(i)
        if w is None:
            downs.append(torch.zeros(first.rank, hidden, dtype=dtype))
            ups.append(torch.zeros(mult * hidden, first.rank, dtype=dtype))
            continue
        if w.up.shape[0] != mult * hidden or w.down.shape[1] != hidden:
            raise ValueError(f"{module} part {i}: shape {tuple(w.up.shape)}x{tuple(w.down.shape)} does not fit "
                             f"a fused module of hidden size {hidden}")
        downs.append(w.down.to(dtype))
        # one .alpha per fused module: parts trained with another scale are rescaled into their up block
        ups.append(w.up.to(dtype) if w.scale == first.scale else (w.up.float() * (w.scale / first.scale)).to(dtype))
    return torch.cat(downs), torch.block_diag(*ups), first.scale
