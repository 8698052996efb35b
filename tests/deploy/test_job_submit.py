"""A real local Ray head (token auth on): `ray job submit`, `flux-ray submit|status|logs|stop`."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("head")
    port, dash = _free_port(), _free_port()
    # The head uses the machine's default token (~/.ray/auth_token, generated if missing): a process
    # that already ran ray.init() keeps the token it loaded, so a per-test token would not match.
    env = dict(os.environ, NUM_CPUS="6", FLUX_RAY_HOME=str(state / "flux_ray_home"), RAY_PORT=str(port), DASHBOARD_PORT=str(dash), FLUX_RAY_STATE_DIR=str(state),
               DASHBOARD_AGENT_PORT=str(_free_port()),
               RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    subprocess.run([str(REPO / "cluster" / "local-head.sh"), "start"], env=env, check=True, timeout=180,
                   capture_output=True)
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    client_env = {"RAY_AUTH_MODE": "token", "PATH": env["PATH"]}
    info = {"address": f"http://127.0.0.1:{dash}", "env": dict(env, **client_env), "token": token,
            "home": Path(env["FLUX_RAY_HOME"])}
    try:
        _wait_for_job_agent(info)
        yield info
    finally:
        subprocess.run([str(REPO / "cluster" / "local-head.sh"), "stop"], env=dict(env, STOP_GRACE_S="5"),
                       timeout=120, capture_output=True)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(port) in current.read_text():
            current.unlink()


def _wait_for_job_agent(head, timeout_s: float = 300) -> None:
    """The head answers before its job agent is up ("No available agent"): wait for a trivial job."""
    client = _client(head)
    deadline = time.time() + timeout_s
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(1)
    while str(getattr(client.get_job_status(job), "value", "")) not in ("SUCCEEDED", "FAILED"):
        time.sleep(0.5)


def _sets(tiny_model_dir, demo_data_dir, out, cache, **extra) -> list[str]:
    values = {"model.pretrained_model_name_or_path": tiny_model_dir, "model.make_tiny_if_missing": "false",
              "datasets.demo.instance_data_dir": demo_data_dir, "datasets.demo.make_demo_if_missing": "false",
              "cache.uri": str(cache), "output.uri": str(out / "output"), "train.max_train_steps": "4",
              "train.log_every": "2", "train.checkpointing_steps": "2", "eval.validation_step_interval": "null",
              "eval.eval_steps_interval": "null", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _client(head):
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"])


def _check_run(out: Path, name: str = "demo") -> dict:
    from mlflow import MlflowClient

    summary = json.loads((out / name / "run_summary.json").read_text())
    assert Path(summary["lora"]).exists() and summary["steps"] == 4
    run = MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    return summary


def test_ray_job_submit_runs_the_demo(head, tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache):
    """jobs/demo.yaml's relative output.uri (README: `ray job submit ... -- flux-ray run jobs/demo.yaml`) lands
    under the head's $FLUX_RAY_HOME, not in the job's unpacked working dir that Ray deletes (#26)."""
    sets = [s for s in _sets(tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache)
            if not s.startswith("output.uri=")]
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--working-dir", str(REPO), "--",
           "flux-ray", "run", "jobs/demo.yaml", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    out = head["home"] / "flux_ray_runs" / "output"
    summary = _check_run(out)
    assert summary["run_uri"] == str(out / "demo") and "runtime_resources" not in json.dumps(summary)
    assert f"outputs:     run {out / 'demo'}" in proc.stdout


def test_flux_ray_submit_waits_and_reports(head, tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache):
    """`flux-ray submit --command cache` waits for the job, echoes its logs and ends with its status.
    (A submitted `run` is checked above through `ray job submit` and below through `--no-wait`.)"""
    import re

    from flux_ray.data.cache_layout import CachePaths, text_key
    from flux_ray.spec import load_spec

    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "jobs" / "demo.yaml").read_text())
    overrides = _sets(tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache)
    sets = [a for s in overrides for a in ("--set", s)]
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", str(spec), "--address", head["address"], "--command",
                           "cache", "--working-dir", str(tmp_path), *sets], env=head["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert head["token"] not in proc.stdout + proc.stderr  # secrets are never printed
    job_id = re.search(r"^submitted (\S+): flux-ray cache ", proc.stdout, re.M).group(1)
    assert proc.stdout.rstrip().endswith(f"{job_id}: SUCCEEDED")
    loaded = load_spec(str(spec), overrides)
    key = text_key(loaded.model, loaded.cache.text_embed_dtype)
    assert f'"text_key": "{key}"' in proc.stdout  # the job's own summary, echoed from its logs
    assert (Path(CachePaths(str(shared_demo_cache)).text(key)) / "manifest.json").exists()


def test_bad_spec_fails_before_any_job_is_created(head, tmp_path):
    client = _client(head)
    before = len(client.list_jobs())
    bad = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    bad["train"]["learnign_rate"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", str(path), "--address", head["address"],
                           "--working-dir", str(tmp_path)], env=head["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.learnign_rate: unknown key" in proc.stderr
    assert len(client.list_jobs()) == before


def test_stop_a_running_job_keeps_its_checkpoint(head, tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache):
    from flux_ray.train.checkpoint import checkpoint_position

    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "jobs" / "demo.yaml").read_text())
    sets = [a for s in _sets(tiny_model_dir, demo_data_dir, tmp_path, shared_demo_cache,
                             **{"train.max_train_steps": "100000"}) for a in ("--set", s)]
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", str(spec), "--address", head["address"], "--no-wait",
                           "--working-dir", str(tmp_path), "--submission-id", "flux-ray-stop-test", *sets],
                          env=head["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "output" / "demo"
    deadline = time.time() + 300
    while time.time() < deadline and len(glob.glob(f"{run_dir}/checkpoint_*")) < 2:
        time.sleep(0.5)
    status = subprocess.run([str(BIN / "flux-ray"), "status", "flux-ray-stop-test", "--address", head["address"]],
                            env=head["env"], capture_output=True, text=True, timeout=60)
    assert "RUNNING" in status.stdout
    assert f"outputs:     run {run_dir}" in status.stdout  # where the job writes, from its logs
    stop = subprocess.run([str(BIN / "flux-ray"), "stop", "flux-ray-stop-test", "--address", head["address"]],
                          env=head["env"], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0
    client = _client(head)
    deadline = time.time() + 120
    while time.time() < deadline and str(client.get_job_status("flux-ray-stop-test")) not in ("STOPPED", "JobStatus.STOPPED"):
        time.sleep(0.5)
    assert str(getattr(client.get_job_status("flux-ray-stop-test"), "value", "")) == "STOPPED"
    logs = subprocess.run([str(BIN / "flux-ray"), "logs", "flux-ray-stop-test", "--address", head["address"]],
                          env=head["env"], capture_output=True, text=True, timeout=60)
    assert "flux_ray" in logs.stdout
    ckpts = sorted(glob.glob(f"{run_dir}/checkpoint_*"))
    assert ckpts
    complete = [c for c in ckpts if (Path(c) / "trainer_state.json").exists()]
    assert complete and checkpoint_position(complete[-1]).step >= 2
    from safetensors.torch import load_file

    assert load_file(str(Path(complete[-1]) / "lora_peft.safetensors"))


def test_remote_output_without_a_tracking_server_is_refused_at_submit(head, tmp_path):
    """The default MLflow store would be a sqlite file on the head: refused on the client, no job created."""
    client = _client(head)
    before = len(client.list_jobs())
    spec = tmp_path / "job.yaml"
    spec.write_text((REPO / "jobs" / "demo.yaml").read_text())
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", str(spec), "--address", head["address"],
                           "--working-dir", str(tmp_path), "--set", "output.uri=s3://bucket/runs"],
                          env=head["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "tracking.mlflow_tracking_uri: not set while output.uri is s3://bucket/runs" in proc.stderr
    assert len(client.list_jobs()) == before
