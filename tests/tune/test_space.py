"""The sweep's search space and checks, without Ray: bad tune sections fail before anything starts."""
from __future__ import annotations

import math

import pytest
from ray.tune.search.sample import Categorical, Float

from flux_ray.spec import SpecError
from flux_ray.tune import space
from flux_ray.tune.report import best_trial, format_table
from flux_ray.tune.trial import DIVERGED, tune_metrics

SPACE = {"train.learning_rate": {"type": "loguniform", "lower": 1e-5, "upper": 1e-3},
         "lora.lora_rank": {"type": "choice", "values": [4, 8]},
         "flow.flow_schedule_shift": {"type": "uniform", "lower": 1.0, "upper": 3.0},
         "train.seed": {"type": "grid", "values": [1, 2, 3]}}


@pytest.fixture
def make_spec(tiny_model_dir, demo_data_dir, tmp_path, demo_spec):
    def make(param_space=None, **tune_options):
        return demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={"eval_steps_interval": 2},
                         flow={"flow_schedule_auto_shift": False},
                         tune={"param_space": SPACE if param_space is None else param_space, **tune_options})
    return make


def test_space_maps_to_tune_domains_and_applies_by_dotted_key(make_spec):
    spec = make_spec(num_samples=2)
    domains = space.param_space(spec)
    assert isinstance(domains["train.learning_rate"], Float)
    assert isinstance(domains["lora.lora_rank"], Categorical)
    assert domains["train.seed"] == {"grid_search": [1, 2, 3]}
    assert space.num_trials(spec) == 6
    sampled = {"train.learning_rate": 3e-4, "lora.lora_rank": 8, "flow.flow_schedule_shift": 2.5,
               "flow.flow_schedule_auto_shift": False, "train.seed": 2}
    trial = space.trial_spec(spec.model_dump(mode="json"), sampled, name="t1", overrides={"output.uri": "/x/trials"})
    assert (trial.train.learning_rate, trial.lora.lora_rank, trial.flow.flow_schedule_shift) == (3e-4, 8, 2.5)
    assert trial.flow.flow_schedule_auto_shift is False and trial.train.seed == 2
    assert trial.name == "t1" and trial.run_uri == "/x/trials/t1" and trial.tune is None
    assert spec.lora.lora_rank == 8 and spec.train.learning_rate == 1e-3  # the base spec is untouched


@pytest.mark.parametrize("param_space, message", [
    ({"output.uri": {"type": "choice", "values": ["/a", "/b"]}}, "fixed for the whole sweep"),
    ({"cache.latent_dtype": {"type": "choice", "values": ["bf16", "fp32"]}}, "fixed for the whole sweep"),
    ({"lora.lora_rank": {"type": "choice", "values": [4, 0]}}, "value 0 makes an invalid spec"),
    ({"train.no_such_key": {"type": "choice", "values": [1]}}, "unknown key"),
])
def test_bad_dimensions_fail_with_the_key(make_spec, param_space, message):
    with pytest.raises(SpecError, match=message) as e:
        space.check_space(make_spec(param_space))
    assert "tune.param_space." in str(e.value)


def test_metric_scheduler_and_searcher_are_checked(make_spec, demo_spec, tiny_model_dir, demo_data_dir, tmp_path):
    no_eval = demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={"eval_steps_interval": None},
                        flow={"flow_schedule_auto_shift": False},
                        tune={"param_space": SPACE})
    with pytest.raises(SpecError, match="eval.eval_steps_interval"):
        space.check_space(no_eval)
    with pytest.raises(SpecError, match="grace_period 40 must be below"):
        space.check_space(make_spec(grace_period=40))
    with pytest.raises(SpecError, match="workers report eval_loss"):
        space.check_space(make_spec(metric="accuracy"))
    with pytest.raises(SpecError, match="has no tune: section"):
        space.check_space(demo_spec(tiny_model_dir, demo_data_dir, tmp_path))
    with pytest.raises(SpecError, match="bayesopt cannot search|needs the 'bayes_opt' package"):
        space.check_space(make_spec(search_alg="bayesopt"))


def test_clip_score_is_a_sweep_metric_only_with_a_clip_model(demo_spec, tiny_model_dir, demo_data_dir, tmp_path,
                                                            tiny_clip_dir):
    def make(mode="max", **ev):
        return demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval=ev, flow={"flow_schedule_auto_shift": False},
                         tune={"param_space": SPACE, "metric": "clip_score", "mode": mode})

    clip = {"evaluation_type": "clip", "pretrained_evaluation_model_name_or_path": tiny_clip_dir}
    space.check_space(make(**clip))  # demo.yaml renders validation images: the sweep can rank by their score
    with pytest.raises(SpecError, match="tune.metric clip_score needs a CLIP model: set eval.evaluation_type: clip"):
        space.check_space(make())
    with pytest.raises(SpecError, match="tune.mode must be max"):
        space.check_space(make(mode="min", **clip))


def test_missing_searcher_package_is_a_clear_error(make_spec, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    no_grid = {k: v for k, v in SPACE.items() if v["type"] != "grid"}
    with pytest.raises(SpecError, match=r"needs the 'optuna' package.*pip install optuna"):
        space.check_space(make_spec(no_grid, search_alg="optuna"))


def test_search_dimension_bounds_are_validated(make_spec):
    with pytest.raises(Exception, match="lower .* must be below upper"):
        make_spec({"train.learning_rate": {"type": "uniform", "lower": 1.0, "upper": 1.0}})
    with pytest.raises(Exception, match="loguniform needs lower > 0"):
        make_spec({"train.learning_rate": {"type": "loguniform", "lower": 0.0, "upper": 1.0}})


def test_a_dimension_that_changes_the_cache_key_is_refused(make_spec):
    from flux_ray.tune.sweep import cache_identity

    ok = make_spec({"lora.lora_rank": {"type": "choice", "values": [4, 8]},
                    "datasets.demo.caption_dropout_probability": {"type": "uniform", "lower": 0.0, "upper": 0.5}})
    space.check_cache_identity(ok, cache_identity)  # training-only keys share the cache
    bad = make_spec({"datasets.demo.resolution": {"type": "choice", "values": [128, 256]}})
    with pytest.raises(SpecError, match=r"datasets.demo.resolution: value 256 changes the cache key"):
        space.check_cache_identity(bad, cache_identity)


def test_default_concurrency_counts_each_trials_workers(make_spec):
    spec = make_spec(num_samples=4)  # 12 trials of one worker: each trains in its Tune actor
    assert space.trains_in_trial(spec) and space.trial_resources(spec, 0.1) == {"CPU": 1.0}
    assert space.default_concurrency(spec, {"CPU": 8.0}, 0.1) == 8  # the worker's CPU, no driver beside it
    spec.scaling.use_gpu = True
    assert space.trial_resources(spec, 0.1) == {"GPU": 1.0, "CPU": 1.0}
    spec.tune.reuse_actors, spec.scaling.use_gpu = False, False  # a TorchTrainer per trial: driver plus worker
    assert space.default_concurrency(spec, {"CPU": 8.0}, 0.1) == 7  # 1.1 CPU a trial
    spec.tune.reuse_actors = None
    spec.scaling.num_workers = 2
    assert not space.trains_in_trial(spec)
    assert space.default_concurrency(spec, {"CPU": 8.0}, 0.1) == 3  # 2.1 CPUs a trial
    spec.scaling.use_gpu = True
    assert space.trial_resources(spec, 0.1) == {"GPU": 2.0, "CPU": 0.1}
    assert space.default_concurrency(spec, {"CPU": 16.0, "GPU": 8.0}, 0.1) == 4
    assert space.default_concurrency(spec, {"CPU": 16.0}, 0.1) == 1  # none fits now: one waits for autoscaling


def test_reuse_actors_with_multi_worker_trials_is_refused(make_spec):
    from flux_ray.spec import load_spec

    data = make_spec().model_dump(mode="json")
    data["scaling"]["num_workers"], data["tune"]["reuse_actors"] = 2, True
    with pytest.raises(SpecError, match=r"tune.reuse_actors: true needs one-worker trials \(scaling.num_workers is 2"):
        load_spec(data=data, check_paths=False)
    data["tune"]["reuse_actors"] = None  # the default: multi-worker trials keep their TorchTrainer
    assert not space.trains_in_trial(load_spec(data=data, check_paths=False))


def test_diverged_metric_becomes_a_finite_worst_value():
    m = tune_metrics({"step": 2, "eval_loss": math.nan}, "eval_loss", "min", {"mlflow_run_id": "r"})
    assert m == {"step": 2, "eval_loss": DIVERGED, "diverged": True, "mlflow_run_id": "r"}
    assert tune_metrics({"eval_loss": math.inf}, "eval_loss", "max", {})["eval_loss"] == -DIVERGED
    assert tune_metrics({"eval_loss": 1.5}, "eval_loss", "min", {}) == {"eval_loss": 1.5}


def test_best_trial_is_the_best_completed_one_and_the_table_marks_it():
    def row(name, status, final, diverged=False):
        return {"trial": name, "status": status, "params": {"lora.lora_rank": 4}, "steps": 8, "best_eval_loss": final,
                "final_eval_loss": final, "diverged": diverged, "mlflow_run_id": name + "-run", "lora": None}
    rows = [row("a", "completed", 1.2), row("b", "stopped_early", 0.5), row("c", "completed", 0.9),
            row("d", "completed", 0.1, diverged=True)]
    best = best_trial(rows, "min")
    assert best["trial"] == "c" and best["value"] == 0.9 and best["mlflow_run_id"] == "c-run"
    assert best_trial(rows, "max")["trial"] == "a"
    assert best_trial([row("x", "stopped_early", 1.0)], "min") is None
    table = format_table(rows, "eval_loss", ["lora.lora_rank"], "c").splitlines()
    assert table[0].split() == ["trial", "status", "steps", "best", "eval_loss", "final", "eval_loss", "lora.lora_rank"]
    assert [line.split()[0] for line in table[2:]] == ["a", "b", "*", "d"]


def test_trial_rows_tell_completed_stopped_errored_and_unfinished_trials(tmp_path):
    from types import SimpleNamespace

    import pandas as pd

    from flux_ray import storage
    from flux_ray.tune.report import trial_rows
    from flux_ray.tune.trial import SweepContext

    ctx = SweepContext(sweep_name="sw", trials_uri=str(tmp_path / "trials"), tracking_uri="unused", parent_run_id="p",
                       metric="eval_loss", mode="min")
    storage.write_json_atomic(str(tmp_path / "trials" / "sw_a" / "run_summary.json"), {"lora": "/x/lora.safetensors"})

    def result(name, losses, error=None, diverged=False):
        df = pd.DataFrame({"step": [2 * (i + 1) for i in range(len(losses))], "eval_loss": losses,
                           "diverged": [diverged] * len(losses)})
        last = {"step": int(df["step"].iloc[-1]), "eval_loss": losses[-1], "mlflow_run_id": f"run-{name}"}
        return SimpleNamespace(path=f"/exp/{name}", metrics_dataframe=df, metrics=last, error=error,
                               config={"lora.lora_rank": 4})

    results = [result("sw_a", [1.5, 1.2, 1.3]), result("sw_b", [DIVERGED], diverged=True),
               result("sw_c", [1.4], error=RuntimeError("boom")), result("sw_d", [1.45])]
    statuses = {"sw_a": "TERMINATED", "sw_b": "TERMINATED", "sw_c": "ERROR", "sw_d": "RUNNING"}
    rows = {r["trial"]: r for r in trial_rows(results, ctx, "eval_loss", "min", statuses)}
    assert {k: r["status"] for k, r in rows.items()} == {"sw_a": "completed", "sw_b": "stopped_early",
                                                         "sw_c": "error", "sw_d": "unfinished"}
    a = rows["sw_a"]
    assert (a["best_eval_loss"], a["final_eval_loss"], a["steps"], a["reports"]) == (1.2, 1.3, 6, 3)
    assert a["lora"] == "/x/lora.safetensors" and a["mlflow_run_id"] == "run-sw_a"
    assert rows["sw_b"]["diverged"] and "boom" in rows["sw_c"]["error"]
    assert best_trial(list(rows.values()), "min")["trial"] == "sw_a"
