"""A 3-trial ASHA sweep of the demo job on a local Ray: early stops free workers, one cache, MLflow tree.

The learning rate is a grid whose third value is absurd. With at most 2 trials at once, trial 3
starts only after trial 1 or 2 has finished, so at its first rung ASHA already holds sane eval
losses to compare with and stops it; its workers and placement group must then be freed.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

MAX_STEPS = 8
ABSURD_LR = 30.0
TUNE = {"param_space": {"train.learning_rate": {"type": "grid", "values": [1e-3, 2e-3, ABSURD_LR]},
                        "train.adam_weight_decay": {"type": "loguniform", "lower": 1e-4, "upper": 1e-2},
                        "lora.lora_rank": {"type": "choice", "values": [4, 8]},
                        "flow.flow_schedule_auto_shift": {"type": "choice", "values": [True, False]}},
        "num_samples": 1, "grace_period": 2, "reduction_factor": 2, "scheduler": "asha", "max_concurrent_trials": 2}


def cache_files(cache_uri: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"shards": [], "manifests": []}
    for root, _, files in os.walk(cache_uri):
        rel = os.path.relpath(root, cache_uri)
        out["shards"] += [os.path.join(rel, f) for f in files if "shards" in rel and f.endswith(".parquet")]
        out["manifests"] += [os.path.join(rel, f) for f in files if f == "manifest.json"]
    return {k: sorted(v) for k, v in out.items()}


def manifest_versions(cache_uri: str) -> dict[str, tuple[int, int]]:
    out = {}
    for rel in cache_files(cache_uri)["manifests"]:
        m = json.load(open(os.path.join(cache_uri, rel)))
        out[os.path.dirname(rel)] = (m["version"], len(m["shards"]))
    return out


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_model_dir, demo_data_dir, tmp_path_factory, demo_spec):
    from flux_ray import job
    from flux_ray.tune.sweep import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    spec = demo_spec(tiny_model_dir, demo_data_dir, out, name="sweep",
                     train={"max_train_steps": MAX_STEPS, "log_every": 2, "checkpointing_steps": 4},
                     eval={"eval_steps_interval": 2, "validation_step_interval": None}, tune=TUNE,
                     tracking={"register_model_name": "sweep-best-lora"})
    job.cache(spec)  # warm: the sweep's own pass then only re-indexes
    before = {"files": cache_files(spec.cache.uri), "versions": manifest_versions(spec.cache.uri)}
    t0 = time.time()
    summary = run_sweep(spec)
    seconds = time.time() - t0
    return spec, summary, before, seconds


def test_asha_stops_the_absurd_trial(sweep):
    spec, summary, _, seconds = sweep
    rows = summary["trials"]
    assert len(rows) == 3, rows
    by_lr = sorted(rows, key=lambda r: r["trial"])
    absurd = by_lr[2]
    assert absurd["params"]["train.learning_rate"] == ABSURD_LR
    assert absurd["status"] == "stopped_early" and absurd["steps"] < MAX_STEPS, absurd
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all(r["steps"] == MAX_STEPS and r["lora"] for r in completed)
    assert all(r["error"] is None for r in rows)
    print(f"sweep of 3 trials: {seconds:.0f}s")


def test_stopped_trials_leave_no_placement_groups(sweep, ray_session):
    from ray.util import placement_group_table

    deadline = time.time() + 30  # Train's PlacementGroupCleaner polls the dead controller
    while True:
        live = {k: v["bundles"] for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
        if not live or time.time() > deadline:
            break
        time.sleep(1)
    assert not live


def test_at_most_max_concurrent_trials_ran_at_once(sweep):
    spec, summary, _, _ = sweep
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    runs = [c.get_run(r["mlflow_run_id"]).info for r in summary["trials"]]
    events = sorted([(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= TUNE["max_concurrent_trials"]


def test_the_cache_is_written_once_and_trials_only_read_it(sweep):
    spec, summary, before, _ = sweep
    after = {"files": cache_files(spec.cache.uri), "versions": manifest_versions(spec.cache.uri)}
    assert after["files"]["shards"] == before["files"]["shards"]  # nothing encoded by the sweep or its trials
    recorded = {k: (v["version"], v["shards"]) for k, v in summary["cache"]["manifests"].items()}
    keys = summary["cache"]["keys"]
    assert set(recorded) == {f"latents/{k}" for k in keys.values()} | {f"text/{summary['cache']['text_key']}"}
    # the session's shared cache may hold other tests' keys too: compare the ones the sweep reads
    assert recorded == {k: after["versions"][k] for k in recorded}  # no commit after the sweep's cache pass
    for key, (version, shards) in after["versions"].items():
        old_version, old_shards = before["versions"][key]
        assert shards == old_shards
        assert version - old_version <= 1  # at most the sweep's one cache pass (a re-index), none per trial


def test_mlflow_has_one_parent_and_a_nested_run_per_trial(sweep):
    spec, summary, _, _ = sweep
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    exp = c.get_experiment_by_name(spec.tracking.experiment_name)
    runs = c.search_runs([exp.experiment_id])
    parent_id = summary["mlflow"]["parent_run_id"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert [r.info.run_id for r in parents] == [parent_id] and len(nested) == 3
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["tune.scheduler"] == "asha"
    by_id = {r.info.run_id: r for r in nested}
    for row in summary["trials"]:
        run = by_id[row["mlflow_run_id"]]
        assert run.info.run_name == row["trial"]
        for key, value in row["params"].items():
            assert run.data.params[key] == str(value), key
        assert run.data.tags["flux_ray.flavour"] == "dev" and run.data.tags["flux_ray.datasets"] == "demo"
        assert run.data.tags["flux_ray.cache_keys"].startswith("demo=")
        assert {"train_loss", "learning_rate", "samples_per_s", "step_time_s", "eval_loss"} <= set(run.data.metrics)
        expected = {"completed": "FINISHED", "stopped_early": "KILLED"}[row["status"]]
        assert run.info.status == expected and run.data.tags["flux_ray.trial_status"] == row["status"]
    # the best trial agrees between sweep_summary.json and MLflow
    best = summary["best"]
    assert parent.data.tags["flux_ray.best_run_id"] == best["mlflow_run_id"]
    assert parent.data.tags["flux_ray.best_trial"] == best["trial"]
    finished = [r for r in nested if r.info.status == "FINISHED"]
    assert min(finished, key=lambda r: r.data.metrics["eval_loss"]).info.run_id == best["mlflow_run_id"]
    best_run = by_id[best["mlflow_run_id"]]
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(best_run.data.metrics["eval_loss"])
    arts = {a.path for a in c.list_artifacts(best["mlflow_run_id"])}
    assert {"lora", "job_spec.yaml", "run_summary.json"} <= arts
    assert "sweep_summary.json" in {a.path for a in c.list_artifacts(parent_id)}
    version = c.get_model_version("sweep-best-lora", best["registered_model"]["version"])
    assert version.run_id == best["mlflow_run_id"] and version.source.endswith("/lora")


def test_best_lora_is_copied_and_the_summary_is_on_disk(sweep):
    spec, summary, _, _ = sweep
    on_disk = json.load(open(os.path.join(spec.run_uri, "sweep_summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    best = summary["best"]
    assert best["params"]["train.learning_rate"] != ABSURD_LR
    copied = os.path.join(spec.run_uri, "best", "pytorch_lora_weights.safetensors")
    assert open(copied, "rb").read() == open(best["lora"], "rb").read()
    assert best["lora"].startswith(os.path.join(spec.run_uri, best["trial"]))  # a one-worker trial: its Tune dir


def test_rerunning_the_sweep_restores_it_with_finished_trials_kept(sweep):
    from flux_ray.spec import SpecError
    from flux_ray.tune.sweep import run_sweep

    spec, summary, _, _ = sweep
    again = run_sweep(spec)
    strip = ("mlflow_run_id", "trial", "status", "steps", "final_eval_loss")
    assert [{k: r[k] for k in strip} for r in again["trials"]] == [{k: r[k] for k in strip} for r in summary["trials"]]
    assert again["best"]["trial"] == summary["best"]["trial"]
    assert again["best"]["registered_model"] == summary["best"]["registered_model"]  # not registered twice
    assert again["mlflow"]["parent_run_id"] == summary["mlflow"]["parent_run_id"]
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    exp = c.get_experiment_by_name(spec.tracking.experiment_name)
    assert len(c.search_runs([exp.experiment_id])) == 4  # no new parent, no new trial runs
    changed = spec.model_copy(deep=True)
    changed.tune.num_samples = 2
    with pytest.raises(SpecError, match="started from a different spec"):
        run_sweep(changed)
