"""Reruns under one name (issue 20 case 1): resume the same training, refuse another, say when complete."""
from __future__ import annotations

import json
import os

import pytest

from flux_ray.spec import SpecError
from flux_ray.train import run_identity as R


@pytest.fixture
def make(tiny_model_dir, demo_data_dir, tmp_path, demo_spec):
    def spec(*overrides):
        return demo_spec(tiny_model_dir, demo_data_dir, tmp_path, overrides=["name=rerun", *overrides])
    return spec


def fake_checkpoint(spec, step: int, name: str | None = None) -> str:
    """What Ray Train leaves under the run: a checkpoint folder holding the loop's trainer_state.json."""
    d = os.path.join(spec.run_uri, name or f"checkpoint_{step:06d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "trainer_state.json"), "w") as f:
        json.dump({"position": {"step": step, "epoch": 0, "batch_index": 0}, "metrics": {"train_loss": 0.5}}, f)
    return d


def test_new_run_then_resume_with_resumable_changes(make):
    spec = make()
    assert R.plan_run(spec).action == "fresh"
    R.record_identity(spec, {"demo": "k1"})
    recorded = json.load(open(os.path.join(spec.run_uri, R.IDENTITY_FILE)))
    assert recorded["digest"] == R.digest(recorded["identity"])
    assert "lora.flux_lora_target" in recorded["identity"] and "train.optimizer" in recorded["identity"]
    assert "train.max_train_steps" not in recorded["identity"] and recorded["cache_keys"] == {"demo": "k1"}
    fake_checkpoint(spec, 10)
    more = make("train.max_train_steps=60", "train.log_every=1", "eval.validation_prompt=another prompt")
    plan = R.plan_run(more)
    assert plan.action == "resume" and plan.steps_done == 10
    assert "resuming at step 10 of 60" in plan.message
    assert set(plan.changed_resumable) == {"train.max_train_steps", "train.log_every", "eval.validation_prompt"}


@pytest.mark.parametrize("override, key", [
    ("lora.flux_lora_target=context", "lora.flux_lora_target: \"all+ffs\" -> \"context\""),
    ("lora.lora_rank=4", "lora.lora_rank: 8 -> 4"),
    ("train.learning_rate=0.0003", "train.learning_rate: 0.001 -> 0.0003"),
    ("train.optimizer=adamw_bf16", "train.optimizer"),
    ("datasets.demo.resolution=256", "datasets.demo.resolution: 128 -> 256"),
    ("flow.flow_schedule_auto_shift=false", "flow.flow_schedule_auto_shift"),
])
def test_rerun_with_another_training_is_refused_naming_keys_and_ways_out(make, override, key):
    spec = make()
    R.record_identity(spec)
    fake_checkpoint(spec, 10)
    with pytest.raises(SpecError) as e:
        R.plan_run(make(override))
    text = str(e.value)
    assert key in text and "new name" in text and "--restart" in text and "previous-" in text
    assert text.count(" -> ") == 1, "only the keys that differ are named"


def test_finished_run_is_complete_not_a_zero_step_run(make):
    spec = make()
    R.record_identity(spec)
    fake_checkpoint(spec, 10)
    ckpt = fake_checkpoint(spec, 30)
    plan = R.plan_run(spec)
    assert plan.action == "complete" and plan.steps_done == 30 and plan.checkpoint_uri == ckpt
    assert "is complete" in plan.message and "re-exported" in plan.message


def test_null_resume_over_old_checkpoints_is_refused(make):
    spec = make()
    R.record_identity(spec)
    fake_checkpoint(spec, 10)
    with pytest.raises(SpecError, match="resume_from_checkpoint is null .* checkpoint at step 10.*--restart"):
        R.plan_run(make("train.resume_from_checkpoint=null"))


@pytest.mark.parametrize("mode", ["keep", "discard"])
def test_restart_keeps_or_discards_the_old_version(make, mode):
    spec = make()
    R.record_identity(spec)
    fake_checkpoint(spec, 10)
    os.makedirs(os.path.join(spec.run_uri, "lora"))
    open(os.path.join(spec.run_uri, "lora", "pytorch_lora_weights.safetensors"), "wb").close()
    other = make("lora.lora_rank=4")
    plan = R.plan_run(other, restart=mode)
    assert plan.action == "fresh" and "restarted from step 0" in plan.message
    left = sorted(os.listdir(spec.run_uri))
    assert R.latest_checkpoint(other)[1] is None
    if mode == "keep":
        (prev,) = left
        assert prev.startswith(R.PREVIOUS_PREFIX) and prev in plan.message
        assert sorted(os.listdir(os.path.join(spec.run_uri, prev))) == ["checkpoint_000010", "lora", R.IDENTITY_FILE]
    else:
        assert left == []
    R.record_identity(other)
    fake_checkpoint(other, 4)
    assert R.plan_run(other).action == "resume"  # the new version resumes; the kept one is not looked at


def test_identity_and_restart_on_s3(make, s3_server):
    """The same on an s3:// output (moto): checkpoints found, the old version copied aside, then deleted."""
    from flux_ray import storage

    bucket = s3_server.create_bucket("runs")
    spec = make(f"output.uri={bucket}/out", f"storage.aws_endpoint_url={s3_server.endpoint}")
    assert R.plan_run(spec).action == "fresh"  # nothing under the run yet
    R.record_identity(spec)
    storage.write_json_atomic(storage.join(spec.run_uri, "checkpoint_000010", "trainer_state.json"),
                              {"position": {"step": 10, "epoch": 0, "batch_index": 0}}, spec.storage)
    assert R.plan_run(spec).action == "resume"
    with pytest.raises(SpecError, match="lora.lora_rank: 8 -> 4"):
        R.plan_run(make(f"output.uri={bucket}/out", f"storage.aws_endpoint_url={s3_server.endpoint}",
                        "lora.lora_rank=4"))
    plan = R.plan_run(spec, restart="keep")
    assert plan.action == "fresh" and R.latest_checkpoint(spec)[1] is None
    kept = {f.rel_path for f in storage.list_files(spec.run_uri, spec.storage)}
    (prev,) = {p.split("/")[0] for p in kept}
    assert prev.startswith(R.PREVIOUS_PREFIX)
    assert {p.split("/", 1)[1] for p in kept} == {R.IDENTITY_FILE, "checkpoint_000010/trainer_state.json"}


def test_cli_refuses_a_changed_rerun_before_ray_starts(make, tmp_path, capsys):
    import ray
    import yaml

    from flux_ray.cli import build_parser, main

    spec = make()
    R.record_identity(spec)
    fake_checkpoint(spec, 10)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    was_up = ray.is_initialized()
    assert main(["train", str(path), "--set", "lora.flux_lora_target=context"]) == 2
    err = capsys.readouterr().err
    assert 'lora.flux_lora_target: "all+ffs" -> "context"' in err and "--restart" in err and "Traceback" not in err
    assert ray.is_initialized() == was_up
    parse = build_parser().parse_args
    assert parse(["run", "x.yaml", "--restart"]).restart == "keep"
    assert parse(["train", "x.yaml", "--restart=discard"]).restart == "discard"
    assert parse(["run", "x.yaml"]).restart is None
