"""Readable progress: one line per report, an ETA from the driver's clock, `flux-ray status` picking the latest
line from a job's log, and a CPU `flux-ray run` that prints progress without the workers' warnings."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from flux_ray.jobs_client import output_lines
from flux_ray.progress import ProgressPrinter, summary_line


def test_one_line_per_report_with_eta_from_the_wall_clock():
    now = [100.0]
    p = ProgressPrinter(100, clock=lambda: now[0])
    first = p.line({"step": 10, "train_loss": 0.51234, "samples_per_s": 12.3, "step_time_s": 0.5})
    assert first == "step  10/100  loss 0.5123  12.3 samples/s  ETA 0:00:45"  # 90 steps x 0.5 s (the step time)
    now[0] += 40.0  # 10 more steps took 40 s of wall time (eval and checkpoint included): 4 s a step
    second = p.line({"step": 20, "train_loss": 0.4, "eval_loss": 0.45, "samples_per_s": 12.0,
                     "validation_grid": "/r/validation/step-000020.png"}, "/r/checkpoint_1")
    assert second == "step  20/100  loss 0.4000  eval 0.4500  12.0 samples/s  ETA 0:05:20  [checkpoint]  [validation]"
    assert summary_line({"steps": 100, "final_loss": 0.3, "eval_loss": None, "seconds": 75.2}) == \
        "done: 100 steps  loss 0.3000  in 0:01:15"


def test_status_shows_the_latest_progress_line_then_the_summary():
    log = ("outputs:     run /r  cache /c\nnoise\nstep  5/10  loss 1.0  ETA 0:00:05\n"
           "step 10/10  loss 0.9  ETA 0:00:00\n")
    assert output_lines(log) == ["outputs:     run /r  cache /c\n", "step 10/10  loss 0.9  ETA 0:00:00\n"]
    done = log + "done: 10 steps  loss 0.9000  in 0:00:30\nLoRA:        /r/lora/x.safetensors\n"
    assert output_lines(done) == ["outputs:     run /r  cache /c\n", "done: 10 steps  loss 0.9000  in 0:00:30\n",
                                  "LoRA:        /r/lora/x.safetensors\n"]


@pytest.mark.slow
def test_cpu_run_prints_progress_not_worker_warnings(tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache,
                                                    demo_spec_data):
    data = demo_spec_data(tiny_model_dir, demo_data_dir, tmp_path, cache_uri=shared_demo_cache, name="quiet",
                          train={"max_train_steps": 4, "log_every": 2, "checkpointing_steps": 4},
                          eval={"eval_steps_interval": 4, "validation_step_interval": 4})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "flux_ray.cli", "run", "job.yaml", "--num-cpus", "8"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], proc.stdout
    assert "eval " in progress[-1] and "[checkpoint]" in progress[-1] and "[validation]" in progress[-1]
    assert "done: 4 steps" in proc.stdout
    both = proc.stdout + proc.stderr
    for noise in ("(RayTrainWorker", "(TrainController", "(MapWorker", "Reporting training result", "torchao",
                  "bitsandbytes", "Warning", "Execution plan of Dataset", "Loading weights", "Writing model shards"):
        assert noise not in both, f"{noise!r} printed:\n{both[-3000:]}"
