"""One-worker sweep trials train in their Tune actor, which the next trial reuses with its loaded model.

Three trials, one at a time: LoRA rank 4, 4, 8 (a grid keeps that order) and a sampled learning rate. The
second trial finds the first one's model in its process and only resets the adapter; the third has another
rank and builds afresh, and its actor is killed (SIGKILL) once its first checkpoint is in: Tune restarts it in
a new process from that checkpoint (``scaling.max_failures``). Each trial's final loss equals a fresh,
uninterrupted build's of the same trial spec.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

MAX_STEPS = 10
TUNE = {"param_space": {"lora.lora_rank": {"type": "grid", "values": [4, 4, 8]},
                        "train.learning_rate": {"type": "loguniform", "lower": 1e-4, "upper": 1e-2}},
        "num_samples": 1, "metric": "train_loss", "scheduler": "fifo", "max_concurrent_trials": 1}


@pytest.fixture(scope="module")
def reused_sweep(ray_session, tiny_model_dir, demo_data_dir, tmp_path_factory, demo_spec):
    from flux_ray.tune.sweep import run_sweep

    out = tmp_path_factory.mktemp("reuse")
    spec = demo_spec(tiny_model_dir, demo_data_dir, out, name="reuse", scaling={"max_failures": 1},
                     train={"max_train_steps": MAX_STEPS, "log_every": 1, "checkpointing_steps": 1},
                     eval={"eval_steps_interval": None, "validation_step_interval": None}, tune=TUNE)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_third_trial_at_its_first_checkpoint, args=(spec.run_uri, killed, stop))
    killer.start()
    try:
        summary = run_sweep(spec)
    finally:
        stop.set()
        killer.join()
    return spec, summary, killed


def _kill_third_trial_at_its_first_checkpoint(run_dir: str, killed: list, stop: threading.Event) -> None:
    """The grid's third trial (Tune's id suffix _00002): SIGKILL its actor once Tune holds a checkpoint of it."""
    while not stop.is_set():
        trial = next((d for d in os.listdir(run_dir) if d.endswith("_00002")), None) if os.path.isdir(run_dir) else None
        results = os.path.join(run_dir, trial, "result.json") if trial else ""
        if trial and os.path.isdir(os.path.join(run_dir, trial, "checkpoint_000000")) and os.path.exists(results):
            with open(results) as f:
                lines = [json.loads(line) for line in f if line.strip()]
            if lines:
                os.kill(lines[0]["pid"], signal.SIGKILL)
                killed.append(lines[0]["pid"])
                return
        time.sleep(0.02)


def _in_start_order(summary) -> list[dict]:
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    return sorted(summary["trials"], key=lambda r: c.get_run(r["mlflow_run_id"]).info.start_time)


def _tune_results(spec, trial: str) -> list[dict]:
    with open(os.path.join(spec.run_uri, trial, "result.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_later_trials_reuse_the_process_and_its_model(reused_sweep):
    spec, summary, killed = reused_sweep
    rows = _in_start_order(summary)
    assert [r["status"] for r in rows] == ["completed"] * 3, rows
    assert [r["params"]["lora.lora_rank"] for r in rows] == [4, 4, 8]
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    reused = [c.get_run(r["mlflow_run_id"]).data.metrics["startup_reused_base"] for r in rows]
    assert reused == [0, 1, 0]  # same model: reused; another rank: built afresh
    pids = [[res["pid"] for res in _tune_results(spec, r["trial"])] for r in rows]
    assert set(pids[0]) == set(pids[1]) == {pids[2][0]} == set(killed)  # one actor ran them all, until the kill
    loads = [c.get_run(r["mlflow_run_id"]).data.metrics["startup_load_s"] for r in rows]
    assert loads[1] < loads[0] / 5 and loads[1] < loads[2] / 5
    # Tune ran each trial's function in a thread of its own; both trained in the process's one trainer thread
    first, second = (_tune_results(spec, r["trial"])[-1] for r in rows[:2])
    assert first["trainer_thread"] == second["trainer_thread"] != first["trial_thread"]
    assert first["trial_thread"] != second["trial_thread"]


def test_a_killed_trial_is_restarted_from_its_checkpoint_in_a_new_process(reused_sweep):
    spec, summary, killed = reused_sweep
    third = _in_start_order(summary)[2]
    assert killed and third["status"] == "completed" and third["steps"] == MAX_STEPS
    results = _tune_results(spec, third["trial"])
    after = [r for r in results if r["pid"] != killed[0]]
    assert after and {r["pid"] for r in after} != set(killed)
    steps = [r["step"] for r in results if "step" in r]
    assert steps[-1] == MAX_STEPS and min(r["step"] for r in after if "step" in r) > 1  # resumed, not from step 1


def test_a_trial_keeps_its_outputs_in_its_tune_directory(reused_sweep):
    spec, summary, _ = reused_sweep
    for row in summary["trials"]:
        run_dir = os.path.join(spec.run_uri, row["trial"])
        run_summary = json.load(open(os.path.join(run_dir, "run_summary.json")))
        assert run_summary["steps"] == MAX_STEPS and row["lora"].startswith(run_dir)
        assert os.path.exists(row["lora"])
        final = run_summary["checkpoint"]
        assert os.path.isdir(final) and os.path.dirname(final) == run_dir
        state = json.load(open(os.path.join(final, "trainer_state.json")))
        assert state["position"]["step"] == MAX_STEPS
        kept = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_"))
        assert len(kept) <= spec.train.checkpoints_total_limit and os.path.basename(final) == kept[-1]


def test_each_trial_trains_as_a_fresh_build_would(reused_sweep):
    from flux_ray.train.build import build_loop_parts
    from flux_ray.train.loop import train_loop
    from flux_ray.tune.space import trial_spec

    spec, summary, _ = reused_sweep
    base = spec.model_dump(mode="json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial's actor (Ray gives a 1-CPU actor one thread)
    try:
        for row in _in_start_order(summary)[1:]:  # the reused trial, and the one rebuilt and resumed after it
            fresh = trial_spec(base, row["params"], name=row["trial"], overrides={"output.uri": spec.run_uri})
            reports: list[dict] = []
            train_loop(build_loop_parts(fresh, torch.device("cpu"), 0, 1), lambda m, _: reports.append(m))
            got = json.load(open(os.path.join(spec.run_uri, row["trial"], "run_summary.json")))["final_loss"]
            assert got == pytest.approx(reports[-1]["train_loss"], rel=1e-5, abs=1e-7), row["trial"]
    finally:
        torch.set_num_threads(threads)


def test_reuse_actors_false_runs_a_torch_trainer_per_trial(ray_session, tiny_model_dir, demo_data_dir,
                                                          tmp_path_factory, demo_spec):
    """The same one-worker trials with tune.reuse_actors: false: each trial drives its own Train run (under
    <sweep>/trials/), and no trial finds a live model."""
    from flux_ray.tune.sweep import run_sweep

    tune = {**TUNE, "param_space": {"lora.lora_rank": {"type": "grid", "values": [4, 4]}}, "reuse_actors": False}
    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path_factory.mktemp("noreuse"), name="noreuse",
                     train={"max_train_steps": 2, "log_every": 1, "checkpointing_steps": 2},
                     eval={"eval_steps_interval": None, "validation_step_interval": None}, tune=tune)
    summary = run_sweep(spec)
    c = MlflowClient(summary["mlflow"]["tracking_uri"])
    rows = _in_start_order(summary)
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert [c.get_run(r["mlflow_run_id"]).data.metrics["startup_reused_base"] for r in rows] == [0, 0]
    for r in rows:
        run_dir = os.path.join(spec.run_uri, "trials", r["trial"])
        assert r["lora"].startswith(run_dir) and os.path.exists(os.path.join(run_dir, "run_summary.json"))
        assert not os.path.exists(os.path.join(spec.run_uri, r["trial"], "run_summary.json"))


def test_in_trainer_thread_runs_every_call_in_one_thread():
    """Calls from several threads run one at a time in one kept thread; results and errors (SystemExit, which
    Tune's report raises in a stopped trial, too) come back to the caller, and the thread outlives them."""
    from flux_ray.tune.local_trial import in_trainer_thread

    seen, out = [], []

    def call():
        out.append(in_trainer_thread(lambda: seen.append(threading.get_ident()) or threading.get_ident()))

    callers = [threading.Thread(target=call) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(set(seen)) == 1 and out == seen and seen[0] != threading.get_ident()
    with pytest.raises(SystemExit):
        in_trainer_thread(lambda: __import__("sys").exit(0))
    with pytest.raises(ValueError, match="bad"):
        in_trainer_thread(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert in_trainer_thread(threading.get_ident) == seen[0]
