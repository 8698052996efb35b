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


def test_random_flux_writer_saves_a_loadable_diffusers_layout(tmp_path):
    """full_size.write_random_flux (FLUX.1-dev sizes on the GPU) with tiny configs: our loaders read it back."""
    from flux_ray.core import model as M
    from flux_ray.core.full_size import FULL_SIZE, write_random_flux
    from flux_ray.core.tiny import TINY_TRANSFORMER, TINY_VAE
    from flux_ray.spec import ModelSpec

    assert FULL_SIZE["transformer"]["num_layers"] == 19 and FULL_SIZE["text_encoder_2"]["d_model"] == 4096
    tiny = {"transformer": TINY_TRANSFORMER, "vae": TINY_VAE,
            "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77, vocab_size=120, projection_dim=32),
            "text_encoder_2": dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1, vocab_size=120,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)}
    path = write_random_flux(tmp_path / "rf", device="cpu", configs=tiny, dtype=torch.float32)
    spec = ModelSpec(pretrained_model_name_or_path=str(path))
    transformer = M.load_transformer(spec, dtype=torch.float32)
    assert transformer.config.num_layers == 1 and not any(p.requires_grad for p in transformer.parameters())
    assert M.load_vae(spec).config.latent_channels == 16
    tok, clip, tok2, t5 = M.load_text_encoders(spec)
    ids = tok2(["a red circle"], padding="max_length", max_length=512, return_tensors="pt").input_ids
    assert ids.shape == (1, 512) and int(ids.max()) < t5.config.vocab_size
    assert t5(ids)[0].shape == (1, 512, 32) and M.load_scheduler_config(spec)["use_dynamic_shifting"]
    assert write_random_flux(path, device="cpu", configs=tiny) == path  # already there: a no-op
