"""FLUX.2 LoRA presets wrap exactly the intended modules; the exported file loads into diffusers' pipelines."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from peft import LoraConfig
from safetensors import safe_open

from flux_ray.core.flux2.flavours import pipeline_class
from flux_ray.core.flux2.lora_io import save_flux2_lora
from flux_ray.core.flux2.lora_targets import FLUX2_LORA_TARGET_PRESETS, resolve_targets
from flux_ray.core.flux2.tiny import TINY_TRANSFORMER
from flux_ray.core.lora import peft_state_dict

D, S = "transformer_blocks.0.", ("single_transformer_blocks.0.", "single_transformer_blocks.1.")
IMG_ATTN = {D + f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")}
TXT_ATTN = {D + f"attn.{m}" for m in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
MLP = {D + f"{ff}.{m}" for ff in ("ff", "ff_context") for m in ("linear_in", "linear_out")}
SINGLE = {s + f"attn.{m}" for s in S for m in ("to_qkv_mlp_proj", "to_out")}
EXPECTED = {"all": IMG_ATTN | TXT_ATTN | MLP | SINGLE, "attention": IMG_ATTN | TXT_ATTN | SINGLE, "mlp": MLP,
            "tiny": {D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"}, "diffusers": IMG_ATTN | SINGLE}


def _wrapped(model) -> set[str]:
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)}


@pytest.mark.parametrize("preset", sorted(FLUX2_LORA_TARGET_PRESETS))
def test_each_preset_wraps_exactly_its_modules(preset):
    assert set(EXPECTED) == set(FLUX2_LORA_TARGET_PRESETS)
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": False})
    targets = resolve_targets(transformer, preset)
    assert set(targets) == EXPECTED[preset]
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    assert _wrapped(transformer) == EXPECTED[preset]


def test_unknown_presets_and_flux1_names_are_refused():
    transformer = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": False})
    with pytest.raises(ValueError, match="unknown FLUX.2 LoRA target preset 'all\\+ffs'"):
        resolve_targets(transformer, "all+ffs")
    with pytest.raises(ValueError, match=r"\['proj_mlp'\] match no Linear"):
        resolve_targets(transformer, modules=["to_q", "proj_mlp"])


def _generate(pipe):
    return pipe(prompt="a red cube", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("flavour", ["klein-4b", "dev"])
def test_exported_lora_loads_in_the_pipeline_and_changes_the_image(tiny_flux2_dirs, tmp_path, flavour):
    cls = pipeline_class(flavour)
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_flux2_dirs[flavour], subfolder="transformer")
    targets = resolve_targets(transformer, "all")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would change nothing
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    sd = peft_state_dict(transformer)
    path = save_flux2_lora(tmp_path, sd, rank=4, alpha=8, target_modules=targets)

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert {k.removeprefix("transformer.") for k in f.keys()} == set(sd)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8

    pipe = cls.from_pretrained(tiny_flux2_dirs[flavour])
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    pipe.load_lora_weights(str(tmp_path))
    (name,) = pipe.transformer.peft_config  # the adapter diffusers created from the file's metadata
    assert pipe.transformer.peft_config[name].r == 4 and pipe.transformer.peft_config[name].lora_alpha == 8
    loaded = {k.replace(f".{name}.", "."): v for k, v in pipe.transformer.named_parameters() if "lora_" in k}
    assert set(loaded) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.items())
    after = _generate(pipe)
    assert np.abs(after - before).max() > 1e-3


def _forward(transformer, seed: int = 0) -> torch.Tensor:
    """The transformer on fixed inputs: 4x4 latent tokens, 8 text tokens."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1),
                                         indexing="ij"), -1).reshape(-1, 4)
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8.0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                           encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                           timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


def test_merged_flux2_transformer_equals_base_plus_lora(tiny_flux2_dirs, tmp_path):
    """Family merge_and_save: the saved diffusers transformer (bf16) gives the PEFT-wrapped model's output, and
    the merge record names the base."""
    from flux_ray.families import get_family
    from flux_ray.spec import ModelSpec

    model_spec = ModelSpec(model_family="flux2", model_flavour="klein-4b",
                           pretrained_model_name_or_path=tiny_flux2_dirs["klein-4b"])
    transformer = Flux2Transformer2DModel.from_pretrained(tiny_flux2_dirs["klein-4b"], subfolder="transformer")
    base = _forward(transformer)
    targets = resolve_targets(transformer, "all")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora_out = _forward(transformer)
    path = save_flux2_lora(tmp_path / "lora", peft_state_dict(transformer), rank=4, alpha=8, target_modules=targets)
    out = get_family("flux2").merge_and_save(path, model_spec, tmp_path / "merged")
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(next(out.glob("*.safetensors"))).values()} == {torch.bfloat16}
    merged_out = _forward(Flux2Transformer2DModel.from_pretrained(out).float())
    assert (lora_out - base).abs().max() > 0.1  # the LoRA matters
    assert (merged_out - lora_out).abs().max() < 0.05 * (lora_out - base).abs().max()  # bf16 weights: close
    assert json.loads((out / "flux_ray_merged_lora.json").read_text())["base_model"] == tiny_flux2_dirs["klein-4b"]
