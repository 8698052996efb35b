"""The tiny Flux loads through from_pretrained; LoRA presets resolve to exactly their modules."""
from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import FluxPipeline

from flux_ray.core import lora as L
from flux_ray.core import model as M
from flux_ray.spec import LORA_TARGET_PRESETS, LoraSpec, ModelSpec


def test_tiny_flux_has_diffusers_layout_and_generates(tiny_model_dir):
    index = json.load(open(os.path.join(tiny_model_dir, "model_index.json")))
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_model_dir, sub)), sub
    vae_cfg = json.load(open(os.path.join(tiny_model_dir, "vae", "config.json")))
    assert vae_cfg["latent_channels"] == 16 and vae_cfg["shift_factor"] == 0.1159
    pipe = FluxPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3) and 0 <= img.min() and img.max() <= 1 and img.std() > 0


def test_components_load_through_model_spec(tiny_model_dir):
    spec = ModelSpec(pretrained_model_name_or_path=tiny_model_dir)
    tr = M.load_transformer(spec, torch.float32)
    assert not any(p.requires_grad for p in tr.parameters())
    override = ModelSpec(pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev",
                         pretrained_transformer_model_name_or_path=tiny_model_dir,
                         pretrained_transformer_subfolder="transformer")
    tr2 = M.load_transformer(override, torch.float32)
    assert torch.equal(next(tr.parameters()), next(tr2.parameters()))
    tok, clip, tok2, t5 = M.load_text_encoders(spec)
    assert clip.config.hidden_size == tr.config.pooled_projection_dim
    assert t5.config.d_model == tr.config.joint_attention_dim
    assert M.load_scheduler_config(spec)["use_dynamic_shifting"] is True


@pytest.mark.parametrize("preset", ["mmdit", "all", "all+ffs", "context", "context+ffs"])
def test_lora_presets_wrap_exactly_their_modules(tiny_model_dir, preset):
    tr = M.load_transformer(ModelSpec(pretrained_model_name_or_path=tiny_model_dir), torch.float32)
    targets = LORA_TARGET_PRESETS[preset]
    expected = {n for t in targets for n in L.matching_modules(tr, t)}
    L.add_lora(tr, LoraSpec(flux_lora_target=preset, lora_rank=4))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    assert wrapped == expected
    suffixes = {next(t for t in targets if w.endswith(t)) for w in wrapped}
    assert suffixes == set(targets)


@pytest.mark.parametrize("preset", ["tiny", "nano"])
def test_presets_naming_missing_blocks_fail_clearly(tiny_model_dir, preset):
    tr = M.load_transformer(ModelSpec(pretrained_model_name_or_path=tiny_model_dir), torch.float32)
    with pytest.raises(ValueError, match=r"flux_lora_target='%s' names modules this transformer lacks" % preset):
        L.add_lora(tr, LoraSpec(flux_lora_target=preset))


def test_custom_target_list_overrides_preset(tiny_model_dir):
    tr = M.load_transformer(ModelSpec(pretrained_model_name_or_path=tiny_model_dir), torch.float32)
    L.add_lora(tr, LoraSpec(flux_lora_target="all+ffs", peft_lora_target_modules=["single_transformer_blocks.0.proj_out"]))
    names = [n for n, _ in tr.named_parameters() if "lora_A" in n]
    assert names == ["single_transformer_blocks.0.proj_out.lora_A.default.weight"]


def test_saved_lora_loads_in_diffusers_with_alpha(tiny_model_dir, tmp_path):
    spec = LoraSpec(lora_rank=4, lora_alpha=2, flux_lora_target="all")
    tr = M.load_transformer(ModelSpec(pretrained_model_name_or_path=tiny_model_dir), torch.float32)
    params = L.add_lora(tr, spec)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.5)
    path = L.save_diffusers_lora(tmp_path, L.peft_state_dict(tr), spec, extra_metadata={"training_steps": 3})
    pipe = FluxPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(path))
    inputs = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]),
                  return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], tr(**inputs)[0], atol=1e-5, rtol=1e-4)
