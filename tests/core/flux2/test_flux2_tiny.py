"""The tiny FLUX.2 models load through diffusers' own pipelines and generate on a CPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from flux_ray.core.flux2.tiny import ensure_tiny_flux2, write_tiny_flux2


@pytest.mark.parametrize("flavour, pipe_cls, te_cls, guidance", [
    ("klein-4b", Flux2KleinPipeline, Qwen3ForCausalLM, False),
    ("dev", Flux2Pipeline, Mistral3ForConditionalGeneration, True)])
def test_tiny_flux2_loads_and_generates(tiny_flux2_dirs, flavour, pipe_cls, te_cls, guidance):
    pipe = pipe_cls.from_pretrained(tiny_flux2_dirs[flavour])
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, Flux2Transformer2DModel) and isinstance(pipe.vae, AutoencoderKLFlux2)
    assert isinstance(pipe.text_encoder, te_cls)
    assert pipe.transformer.config.guidance_embeds is guidance
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    out = pipe(prompt="a red cube", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0


def test_ensure_tiny_flux2_keeps_an_existing_model(tiny_flux2_dirs):
    index = os.path.join(tiny_flux2_dirs["dev"], "model_index.json")
    stamp = os.stat(index).st_mtime_ns
    assert str(ensure_tiny_flux2(tiny_flux2_dirs["dev"], "klein-4b")) == tiny_flux2_dirs["dev"]
    assert os.stat(index).st_mtime_ns == stamp and '"Flux2Pipeline"' in open(index).read()


def test_write_tiny_flux2_refuses_to_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_tiny_flux2(tmp_path / "m", "klein-4b")
    with pytest.raises(ValueError, match="unknown FLUX.2 flavour"):
        write_tiny_flux2(tmp_path / "n", "klein-2b")


def test_cli_tiny_model_flux2_writes_the_flavour(tmp_path, capsys):
    from flux_ray.cli import main

    assert main(["tiny-model", str(tmp_path / "k"), "--family", "flux2", "--flavour", "klein-4b"]) == 0
    assert '"Flux2KleinPipeline"' in (tmp_path / "k" / "model_index.json").read_text()
    assert main(["tiny-model", str(tmp_path / "x"), "--family", "flux2", "--flavour", "schnell"]) == 2
    assert main(["tiny-model", str(tmp_path / "y"), "--flavour", "klein-4b"]) == 2
    assert "not a FLUX.2 flavour" in capsys.readouterr().out
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tiny_vae_batch_norm_statistics_reload_bit_identically(tiny_flux2_dirs):
    """The VAE's batch-norm buffers (FLUX.2's latent normalisation) are saved and from_pretrained loads them: no
    missing keys, the writer's random values, not BatchNorm's defaults 0 / 1."""
    from flux_ray.core.flux2.tiny import build_tiny_flux2_pipeline

    written = build_tiny_flux2_pipeline("klein-4b").vae.bn  # the writer's values (seed 0)
    vae, info = AutoencoderKLFlux2.from_pretrained(tiny_flux2_dirs["klein-4b"], subfolder="vae",
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(vae.bn.running_mean, written.running_mean)
    assert torch.equal(vae.bn.running_var, written.running_var)
    assert vae.bn.running_mean.abs().min() > 0 and (vae.bn.running_var - 1).abs().max() > 0.1
