"""The demo job end to end on a local Ray: cache -> train -> LoRA -> MLflow -> run_summary.json."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from mlflow import MlflowClient

from flux_ray.spec import flat_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(ray_session, tiny_model_dir, demo_data_dir, tmp_path_factory, demo_spec):
    from flux_ray import job

    out = tmp_path_factory.mktemp("demo_run")
    spec = demo_spec(tiny_model_dir, demo_data_dir, out,
                     train={"max_train_steps": 30, "log_every": 5, "checkpointing_steps": 10},
                     eval={"eval_steps_interval": 10, "validation_step_interval": 30})
    summary = job.run(spec)
    return spec, summary


def test_summary_points_at_real_outputs(demo_run):
    spec, summary = demo_run
    on_disk = json.loads(open(f"{spec.run_uri}/run_summary.json").read())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["steps"] == 30
    assert summary["lora"].endswith("lora/pytorch_lora_weights.safetensors")
    assert summary["cache"]["datasets"]["demo"]["usable"] == 24


def test_loss_falls_with_fixed_seed(demo_run):
    spec, summary = demo_run
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    train = [m.value for m in sorted(c.get_metric_history(summary["mlflow"]["run_id"], "train_loss"),
                                     key=lambda m: m.step)]
    evals = [m.value for m in sorted(c.get_metric_history(summary["mlflow"]["run_id"], "eval_loss"),
                                     key=lambda m: m.step)]
    assert len(train) == 6 and len(evals) == 3
    assert sum(train[-2:]) / 2 < sum(train[:2]) / 2
    assert evals[-1] < evals[0]


def test_mlflow_run_agrees_with_summary(demo_run):
    spec, summary = demo_run
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    run = c.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key, value in flat_params(spec).items():
        assert params[key] == str(value)[:6000], key
    assert run.data.metrics["train_loss"] == pytest.approx(summary["final_loss"])
    assert run.data.metrics["final_train_loss"] == pytest.approx(summary["final_loss"])
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"lora", "run_summary.json", "job_spec.yaml", "validation"} <= arts
    assert [a.path for a in c.list_artifacts(run.info.run_id, "lora")] == ["lora/pytorch_lora_weights.safetensors"]
    assert run.data.tags["flux_ray.flavour"] == "dev"
    assert run.data.tags["flux_ray.cache_keys"].startswith("demo=")


def test_lora_loads_into_pipeline_and_changes_output(demo_run, tiny_model_dir):
    spec, summary = demo_run
    pipe = FluxPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipe.load_lora_weights(summary["lora"])
    after = render()
    assert (after - before).abs().max() > 1e-3


def test_rerun_same_name_resumes_instead_of_retraining(demo_run):
    """The same job again finds the cache and the finished run's latest checkpoint: it says it is complete,
    re-exports the LoRA (here also in kohya format) and trains nothing (no Ray Train run, no new MLflow run)."""
    from flux_ray import job

    spec, first = demo_run
    from safetensors import safe_open

    def tensors_and_steps(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata().get("flux_ray.training_steps")

    lora_before, steps_before = tensors_and_steps(first["lora"])
    again = job.run(spec.model_copy(update={"output": spec.output.model_copy(
        update={"export_formats": ["diffusers", "kohya"]})}))
    assert again["rerun"] == "complete" and "is complete" in again["rerun_message"]
    assert again["steps"] == 30 and again["steps_trained_now"] == 0
    assert again["mlflow"] == first["mlflow"]
    lora_after, steps_after = tensors_and_steps(again["lora"])
    assert steps_after == steps_before == "30"
    assert lora_after.keys() == lora_before.keys() and all(torch.equal(lora_after[k], lora_before[k]) for k in lora_after)
    import glob
    assert glob.glob(f"{spec.run_uri}/lora/kohya/*.safetensors")
    assert again["cache"]["datasets"]["demo"]["encoded_this_run"] == 0
    assert again["cache"]["captions_encoded"] == 0


def test_rerun_with_another_lora_shape_is_refused_before_ray_work(demo_run):
    """Issue 20 case 1: a changed target preset used to resume the old checkpoint and die inside torch."""
    from flux_ray import job
    from flux_ray.spec import SpecError, load_spec

    spec, _ = demo_run
    other = load_spec(data=spec.model_dump(mode="json"), overrides=["lora.flux_lora_target=context"])
    with pytest.raises(SpecError, match=r"lora.flux_lora_target: \"all\+ffs\" -> \"context\"[\s\S]*--restart"):
        job.run(other)
