"""FLUX.2 [klein] 4B (tiny) end to end through job.run: cache -> train -> diffusers export -> the LoRA loads into
Flux2KleinPipeline and changes its output."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux2_run(ray_session, demo_data_dir, tmp_path_factory):
    from flux_ray import job
    from flux_ray.spec import load_spec
    from tests.conftest import demo_spec_dict

    out = tmp_path_factory.mktemp("flux2_run")
    model_dir = out / "tiny-flux2-klein-4b"  # written by make_tiny_if_missing
    data = demo_spec_dict(str(model_dir), demo_data_dir, out,
                          model={"model_family": "flux2", "model_flavour": "klein-4b", "make_tiny_if_missing": True},
                          lora={"flux_lora_target": "all"},
                          train={"max_train_steps": 6, "log_every": 1, "checkpointing_steps": 3},
                          eval={"eval_steps_interval": 3, "validation_step_interval": None})
    spec = load_spec(data=data)
    return spec, job.run(spec), str(model_dir)


def test_flux2_trains_and_exports(flux2_run):
    spec, summary, model_dir = flux2_run
    assert summary["steps"] == 6 and summary["cache"]["datasets"]["demo"]["usable"] == 24
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    losses = [m.value for m in sorted(c.get_metric_history(summary["mlflow"]["run_id"], "train_loss"),
                                      key=lambda m: m.step)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses)) > 1
    manifest = json.loads(open(f"{spec.cache.uri}/text/{_only(spec.cache.uri + '/text')}/manifest.json").read())
    assert manifest["shards"]
    from safetensors import safe_open

    with safe_open(summary["lora"], "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A") for k in keys)
    assert any(k.startswith("transformer.transformer_blocks.0.ff.linear_in.lora_B") for k in keys)


def _only(d: str) -> str:
    import os

    (name,) = os.listdir(d)
    return name


def test_flux2_lora_loads_into_klein_pipeline_and_changes_output(flux2_run):
    from diffusers import Flux2KleinPipeline

    spec, summary, model_dir = flux2_run
    pipe = Flux2KleinPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    before = render()
    assert torch.equal(render(), before)  # deterministic: any difference below is the LoRA's
    pipe.load_lora_weights(summary["lora"])
    after = render()
    assert (after - before).abs().max() > 1e-4  # 6 steps on the tiny model: a small but real change
