"""FLUX.2 [klein] 4B (tiny) end to end through job.run: cache -> train (with validation images and their CLIP
scores) -> diffusers export -> the LoRA loads into Flux2KleinPipeline and changes its output -> merge."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


VALIDATION = {"validation_step_interval": 6, "validation_prompt": "a red circle", "validation_resolution": "64x64",
              "validation_num_inference_steps": 2, "validation_guidance": 2.0, "validation_negative_prompt": "blurry",
              "evaluation_type": "clip"}


@pytest.fixture(scope="module")
def flux2_run(ray_session, demo_data_dir, demo_spec_data, tiny_clip_dir, tmp_path_factory):
    from flux_ray import job
    from flux_ray.spec import load_spec

    out = tmp_path_factory.mktemp("flux2_run")
    model_dir = out / "tiny-flux2-klein-4b"  # written by make_tiny_if_missing
    data = demo_spec_data(str(model_dir), demo_data_dir, out,
                          model={"model_family": "flux2", "model_flavour": "klein-4b", "make_tiny_if_missing": True},
                          lora={"flux_lora_target": "all"},
                          train={"max_train_steps": 6, "log_every": 1, "checkpointing_steps": 3,
                                 "learning_rate": 5e-2},  # a LoRA effect that survives 8-bit PNGs
                          eval={"eval_steps_interval": 3, **VALIDATION,
                                "pretrained_evaluation_model_name_or_path": tiny_clip_dir})
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


def test_flux2_validation_images_are_rendered_logged_and_show_the_lora(flux2_run, tmp_path):
    """Validation at step 6 renders through Flux2KleinPipeline with the live LoRA: the PNG and its CLIP scores are
    logged to MLflow, the image is what diffusers renders with the exported LoRA loaded (same embeddings, CFG against
    the negative prompt) and differs from the base model's render."""
    import numpy as np
    from diffusers import Flux2KleinPipeline
    from PIL import Image

    from flux_ray.core.validation import Validator

    spec, summary, model_dir = flux2_run
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    run_id = summary["mlflow"]["run_id"]
    assert [a.path for a in c.list_artifacts(run_id, "validation")] == ["validation/step-000006.clip_score.json",
                                                                        "validation/step-000006.png"]
    scores = [m for m in c.get_metric_history(run_id, "clip_score")]
    assert [m.step for m in scores] == [6] and scores[0].value > 0
    logged = np.asarray(Image.open(c.download_artifacts(run_id, "validation/step-000006.png", str(tmp_path))),
                        dtype=np.float32)
    assert logged.shape == (64, 64, 3)

    pipe = Flux2KleinPipeline.from_pretrained(model_dir)

    def render(transformer):
        v = Validator(spec, transformer, torch.device("cpu"), write=False)
        assert v.negative_prompt == "blurry" and v.guidance == {"guidance_scale": 2.0}
        return np.asarray(v.render()[0][1], dtype=np.float32)

    base = render(pipe.transformer)
    pipe.load_lora_weights(summary["lora"])
    with_lora = render(pipe.transformer)
    assert np.abs(with_lora - logged).max() <= 1.0  # the trainer's live LoRA == the exported file, up to rounding
    assert np.abs(base - logged).mean() > 1.0  # the LoRA's effect (about 5 levels on average, up to ~100)


def test_flux2_export_merge_from_the_run_and_from_a_lone_file(flux2_run, tmp_path, capsys):
    """``flux-ray export RUN --merge``: the run's spec (from its MLflow store) picks the FLUX.2 family; a lone
    LoRA file names its family and base in its header, and merges to the same weights."""
    import shutil
    from argparse import Namespace
    from pathlib import Path

    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from flux_ray.export import export_cli

    spec, summary, model_dir = flux2_run

    def merge(source, out):
        assert export_cli(Namespace(source=str(source), format="diffusers", out=str(out), merge=True,
                                    spec_path=None)) == 0
        assert Path(capsys.readouterr().out.strip()) == out
        assert isinstance(Flux2Transformer2DModel.from_pretrained(out), Flux2Transformer2DModel)
        return load_file(next(out.glob("*.safetensors")))

    from_run = merge(spec.run_uri, tmp_path / "merged")
    with safe_open(summary["lora"], "pt") as f:
        assert f.metadata()["flux_ray.model_family"] == "flux2"
    lone = tmp_path / "elsewhere" / "lora.safetensors"
    lone.parent.mkdir()
    shutil.copy(summary["lora"], lone)
    from_file = merge(lone, tmp_path / "merged2")
    assert from_run.keys() == from_file.keys() and all(torch.equal(from_run[k], from_file[k]) for k in from_run)
    base = load_file(next((Path(model_dir) / "transformer").glob("*.safetensors")))
    key = "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"
    assert not torch.equal(from_run[key], base[key].to(torch.bfloat16))  # the LoRA is fused in


@pytest.mark.parametrize("overrides", [
    ["model.base_model_precision=int8-quanto"],
    ["model.base_model_precision=int4-quanto"],
    ["train.tread_config={routes: [{selection_ratio: 0.5, start_layer_idx: 0, end_layer_idx: -2}]}",
     "train.gradient_checkpointing=true"],
    ["model.enable_group_offload=true", "train.gradient_checkpointing=true"],
], ids=["int8-quanto", "int4-quanto", "tread", "group-offload"])
def test_flux2_levers_train_through_the_loop(flux2_run, overrides):
    """The trainer's build and loop (in-process, on flux2_run's cache) with a FLUX.2 memory / speed lever: the
    base is what the lever makes it, and the losses are finite and move."""
    from optimum.quanto import QModuleMixin

    from flux_ray.spec import load_spec
    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.loop import train_loop

    spec, _, _ = flux2_run
    spec = load_spec(data=spec.model_dump(mode="json"),
                     overrides=overrides + ["train.max_train_steps=3", "train.log_every=1"])
    parts = build_loop_parts(spec, torch.device("cpu"), 0, 1)
    base = parts.model.single_transformer_blocks[0].attn.to_qkv_mlp_proj.base_layer
    assert isinstance(base, QModuleMixin) is ("quanto" in overrides[0])
    assert (parts.loss_fn.tread is not None) is ("tread" in overrides[0])
    assert hasattr(parts.model, "_flux_ray_offload") is ("offload" in overrides[0])
    reports = []
    train_loop(parts, lambda metrics, ckpt: reports.append(metrics))
    losses = [r["train_loss"] for r in reports]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) > 1
