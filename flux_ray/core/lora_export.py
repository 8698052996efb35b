"""LoRA files that load everywhere: diffusers, ComfyUI and kohya layouts, or merged into the base.

Formats (every one is loaded back by diffusers' own ``FluxPipeline.load_lora_weights`` in the tests):

- ``diffusers``: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` in
  ``pytorch_lora_weights.safetensors``, the LoRA config (r, lora_alpha, target_modules) in the
  ``lora_adapter_metadata`` entry of the safetensors header, as diffusers' ``save_lora_weights`` writes it.
- ``kohya``: sd-scripts' Flux naming on BFL's module layout, ``lora_unet_double_blocks_0_img_attn_qkv``
  with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``. ComfyUI, Forge and diffusers read it.
- ``comfyui``: the same tensors under ComfyUI's own names (what its LoRA save node writes):
  ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``. diffusers reads it too.

BFL fuses q/k/v (and, in single blocks, q/k/v/proj_mlp) into one Linear. Their LoRAs are fused
exactly: the down matrices are stacked, the up matrices placed block-diagonally, so the fused delta
is the same matrix; parts that were not trained get zero blocks of the same rank, so each part keeps
its own rank and diffusers' converter splits the file back into exactly the trained matrices.

Alpha: every loader applies ``alpha / rank`` with rank read off the tensor. Fusing n parts of rank r
makes the rank n*r, so the fused ``.alpha`` is ``n * alpha`` (same ratio). diffusers' converter ignores
the ``.alpha`` of the two ``final_layer`` modules, so there the scale is folded into ``lora_up`` and
``.alpha`` is set to the rank: ComfyUI, kohya and diffusers then agree.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from flux_ray.core import bfl_names
from flux_ray.core.lora import LORA_WEIGHT_NAME

log = logging.getLogger("flux_ray.export")

FORMATS = ("diffusers", "comfyui", "kohya")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
SECRET_PARTS = ("secret", "password", "token", "access_key", "credential")
_UNSUPPORTED_CONFIG = ("use_dora", "use_rslora", "alpha_pattern", "rank_pattern")


@dataclass
class LoraWeights:
    """The LoRA of one Linear: delta W = scale * up @ down."""
    down: torch.Tensor
    """lora_A / lora_down, [rank, in_features]."""
    up: torch.Tensor
    """lora_B / lora_up, [out_features, rank]."""
    scale: float
    """alpha / rank as the trainer applied it."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


# ---------------------------------------------------------------- reading

def read_lora(path: str | os.PathLike, spec=None) -> tuple[dict[str, LoraWeights], dict[str, str]]:
    """A diffusers-format or PEFT-keyed LoRA file -> ({module name in the transformer: weights}, header).

    Alpha comes from the file's ``lora_adapter_metadata``, then its ``flux_ray.lora_alpha``, then
    ``spec.lora``; a PEFT file (a checkpoint's ``lora_peft.safetensors``) with none of them is an error.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if any(".lora_down.weight" in k for k in tensors):
        raise ValueError(f"{path} is already in kohya/ComfyUI layout (lora_down/lora_up keys); "
                         "export reads diffusers or PEFT LoRA files")
    prefixed = any(k.startswith("transformer.") for k in tensors)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix("transformer.").removeprefix("base_model.model.")
        for kind in ("lora_A", "lora_B", "alpha"):
            suffix = f".{kind}.weight" if kind != "alpha" else ".alpha"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[kind] = value
                break
        else:
            raise ValueError(f"{path}: unexpected key {key!r} (not a LoRA A/B/alpha tensor)")
    alpha = _file_alpha(header, spec, path, prefixed or any("alpha" in p for p in pairs.values()))
    lora = {}
    for name, p in sorted(pairs.items()):
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"{path}: module {name!r} lacks lora_A or lora_B")
        rank = p["lora_A"].shape[0]
        module_alpha = float(p["alpha"]) if "alpha" in p else (alpha if alpha is not None else rank)
        lora[name] = LoraWeights(p["lora_A"], p["lora_B"], module_alpha / rank)
    return lora, header


def _file_alpha(header: dict, spec, path, diffusers_semantics: bool) -> float | None:
    config = json.loads(header.get(ADAPTER_METADATA_KEY) or "{}")
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    bad = [k for k in _UNSUPPORTED_CONFIG if config.get(k)]
    if bad:
        raise ValueError(f"{path}: LoRA config uses {bad}, which export does not support")
    candidates = [("the file's lora_adapter_metadata", config.get("lora_alpha")),
                  ("the file's flux_ray.lora_alpha", header.get("flux_ray.lora_alpha")),
                  ("the job spec", spec.lora.alpha if spec is not None else None)]
    found = [(where, float(v)) for where, v in candidates if v is not None]
    if found:
        if any(v != found[0][1] for _, v in found):
            log.warning("%s: lora_alpha differs between sources %s; using %s", path, found, found[0][0])
        return found[0][1]
    if diffusers_semantics:
        log.warning("%s has no LoRA config; reading it as diffusers does (alpha = rank)", path)
        return None
    raise ValueError(f"cannot tell the lora_alpha of {path}: it has no LoRA metadata; pass the job spec (--spec)")


# ---------------------------------------------------------------- writing

def diffusers_state_dict(lora: dict[str, LoraWeights]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, LoRA config) for a diffusers file; one rank for all modules (diffusers metadata holds one r)."""
    ranks = {w.rank for w in lora.values()}
    if len(ranks) != 1:
        raise ValueError(f"diffusers format needs one rank for all modules, got {sorted(ranks)}")
    rank = ranks.pop()
    scales = {w.scale for w in lora.values()}
    fold = len(scales) > 1  # differing scales: fold each into lora_B and set alpha = r
    alpha = rank if fold else scales.pop() * rank
    tensors = {}
    for name, w in lora.items():
        up = (w.up.float() * w.scale).to(w.up.dtype) if fold else w.up
        tensors[f"transformer.{name}.lora_A.weight"] = w.down.contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = up.contiguous()
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(lora), "lora_dropout": 0.0,
              "use_dora": False, "bias": "none"}
    return tensors, config


def lora_info(lora: dict[str, LoraWeights], header: dict, spec=None, metadata: dict | None = None) -> dict:
    """What the file says about itself: carried-over flux_ray.* header, spec facts, caller's metadata."""
    info = {k.removeprefix("flux_ray."): _loads(v) for k, v in header.items() if k.startswith("flux_ray.")}
    if spec is not None:
        info.update(spec_info(spec))
    info.update(metadata or {})
    ranks = sorted({w.rank for w in lora.values()})
    info["lora_rank"] = ranks[0] if len(ranks) == 1 else ranks
    alphas = sorted({w.scale * w.rank for w in lora.values()})
    info["lora_alpha"] = alphas[0] if len(alphas) == 1 else alphas
    return {k: v for k, v in info.items() if not any(s in k.lower() for s in SECRET_PARTS)}


def spec_info(spec) -> dict:
    """Non-secret facts about the job for the file header."""
    prompts = [d.instance_prompt for d in spec.enabled_datasets() if d.instance_prompt]
    return {"name": spec.name, "base_model": spec.model.base_path, "model_family": spec.model.model_family,
            "model_flavour": spec.model.model_flavour,
            "dataset_ids": [d.id for d in spec.enabled_datasets()], "instance_prompt": prompts[0] if prompts else "",
            "flux_lora_target": spec.lora.flux_lora_target}


def _loads(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def header_metadata(fmt: str, info: dict) -> dict[str, str]:
    """safetensors header: flux_ray.* for every format; kohya ``ss_*`` and SAI ``modelspec.*`` for BFL files."""
    meta = {"format": "pt"}
    meta.update({f"flux_ray.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    if fmt == "diffusers":
        return meta
    arch = "flux-1-schnell" if info.get("model_flavour") == "schnell" else "flux-1-dev"
    meta.update({"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                 "ss_network_dim": str(info["lora_rank"]), "ss_network_alpha": str(info["lora_alpha"]),
                 "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
                 "modelspec.implementation": "https://github.com/black-forest-labs/flux",
                 "modelspec.title": str(info.get("name", "flux_lora"))})
    if info.get("training_steps") is not None:
        meta["ss_steps"] = str(info["training_steps"])
    if info.get("instance_prompt"):
        meta["modelspec.trigger_phrase"] = str(info["instance_prompt"])
    return meta


def _save_atomic(tensors: dict, path: Path, meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def export_lora_file(src_file: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, spec=None,
                     metadata: dict | None = None, filename: str | None = None) -> Path:
    """Write the LoRA of ``src_file`` (diffusers or PEFT keys) in ``fmt`` under ``out_dir``; returns the file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    lora, header = read_lora(src_file, spec)
    if not lora:
        raise ValueError(f"{src_file} holds no LoRA tensors")
    info = lora_info(lora, header, spec, metadata)
    meta = header_metadata(fmt, info)
    if fmt == "diffusers":
        tensors, config = diffusers_state_dict(lora)
        meta[ADAPTER_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                indent=2, sort_keys=True)
        name = filename or LORA_WEIGHT_NAME
    else:
        tensors = bfl_names.bfl_state_dict(lora, fmt)
        name = filename or f"{info.get('name', 'flux_lora')}_{fmt}.safetensors"
    return _save_atomic(tensors, Path(out_dir) / name, meta)


# ---------------------------------------------------------------- merging

def merge_lora(transformer: torch.nn.Module, lora: dict[str, LoraWeights] | str | os.PathLike,
               spec=None) -> torch.nn.Module:
    """Add scale * up @ down to each adapted Linear's weight in place (computed in fp32); returns the model."""
    if not isinstance(lora, dict):
        lora = read_lora(lora, spec)[0]
    modules = dict(transformer.named_modules())
    for name, w in lora.items():
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"the LoRA adapts {name!r}, which is not a Linear of this transformer")
        weight = linear.weight.data
        if weight.shape != (w.up.shape[0], w.down.shape[1]):
            raise ValueError(f"{name}: LoRA delta {w.up.shape[0]}x{w.down.shape[1]} vs weight {tuple(weight.shape)}")
        linear.weight.data = (weight.float() + w.delta().to(weight.device)).to(weight.dtype)
    return transformer


def merge_and_save(src_file: str | os.PathLike, model_spec, out_dir: str | os.PathLike, spec=None,
                   dtype: torch.dtype = torch.bfloat16, load_transformer=None) -> Path:
    """Load the base transformer of ``model_spec``, fuse the LoRA, save it as a diffusers transformer folder.

    ``load_transformer(model_spec, dtype=...)``: the family's loader (default FLUX.1's core/model.py)."""
    if load_transformer is None:
        from flux_ray.core.model import load_transformer

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    lora, header = read_lora(src_file, spec)
    transformer = merge_lora(load_transformer(model_spec, dtype=dtype), lora)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=out.parent))
    try:
        transformer.save_pretrained(tmp, safe_serialization=True)
        info = lora_info(lora, header, spec) | {"lora_file": str(src_file), "base_model": model_spec.base_path}
        (tmp / "flux_ray_merged_lora.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
