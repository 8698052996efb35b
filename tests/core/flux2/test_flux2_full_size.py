"""Full-size FLUX.2 configs, checked on the meta device (nothing materialised), and the random writer's layout."""
from __future__ import annotations

import pytest
import torch

from flux_ray.core.flux2.flavours import FLAVOURS, FLUX2_VAE, pipeline_class
from flux_ray.core.flux2.full_size import (build_component, parameter_count, reduced_text_encoder_config,
                                           write_random_flux2)
from flux_ray.core.flux2.tiny import TINY_QWEN3, TINY_TRANSFORMER, TINY_VAE, qwen3_tokenizer

# published sizes: klein 4B / 9B flow models and FLUX.2 [dev]'s 32B; Qwen3-4B, Qwen3-8B, Mistral-Small-3.1-24B
SIZES_B = {("klein-4b", "transformer"): (3.8, 4.0), ("klein-4b", "text_encoder"): (4.0, 4.05),
           ("klein-9b", "transformer"): (9.0, 9.2), ("klein-9b", "text_encoder"): (8.1, 8.3),
           ("dev", "transformer"): (32.0, 32.5), ("dev", "text_encoder"): (23.9, 24.1)}


@pytest.mark.parametrize("flavour, component", sorted(SIZES_B))
def test_full_size_parameter_counts_match_the_published_models(flavour, component):
    lo, hi = SIZES_B[flavour, component]
    assert lo * 1e9 <= parameter_count(flavour, component) <= hi * 1e9


def test_flavour_configs_fit_together():
    assert 80e6 < parameter_count("klein-4b", "vae") < 90e6
    for fl in FLAVOURS.values():
        t = fl.transformer
        assert t["in_channels"] == 4 * FLUX2_VAE["latent_channels"]
        assert t["joint_attention_dim"] == fl.prompt_embed_dim
        assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
        assert t["guidance_embeds"] is fl.guidance_embeds is (fl.name == "dev")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_reduced_text_encoder_keeps_what_the_transformer_sees(flavour):
    """The bench's small text encoder: the real class and width (prompt embeddings as wide as the transformer's
    joint_attention_dim), deep enough for every stacked layer, and a small fraction of the real size."""
    fl, cfg = FLAVOURS[flavour], reduced_text_encoder_config(flavour)
    enc = build_component(flavour, "text_encoder", "meta", config=cfg)
    text = enc.config.get_text_config()
    assert type(enc) is type(build_component(flavour, "text_encoder", "meta"))
    assert len(fl.text_encoder_layers) * text.hidden_size == fl.transformer["joint_attention_dim"]
    assert text.num_hidden_layers == max(fl.text_encoder_layers) + 1
    assert parameter_count(flavour, "text_encoder", cfg) < 0.1 * parameter_count(flavour, "text_encoder")


def test_write_random_flux2_layout_loads_in_the_pipeline(tmp_path):
    """The writer's folder layout and model_index, with small configs on the CPU."""
    configs = {"transformer": {**TINY_TRANSFORMER, "guidance_embeds": False}, "vae": TINY_VAE,
               "text_encoder": {**TINY_QWEN3, "vocab_size": len(qwen3_tokenizer())}}
    out = write_random_flux2(tmp_path / "r", "klein-4b", device="cpu", dtype=torch.float32, configs=configs)
    pipe = pipeline_class("klein-4b").from_pretrained(out)
    assert pipe.transformer.config.num_single_layers == TINY_TRANSFORMER["num_single_layers"]
    assert pipe.text_encoder.config.num_hidden_layers == 27
    embeds, _ = pipe.encode_prompt("a cube", max_sequence_length=16)
    assert embeds.shape == (1, 16, 48)
    stamp = (out / "transformer").stat().st_mtime_ns
    assert write_random_flux2(out, "klein-4b", device="cpu", configs=configs) == out  # a no-op when present
    assert (out / "transformer").stat().st_mtime_ns == stamp
