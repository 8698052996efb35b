"""A short job logging to a real `mlflow server` over HTTP (sqlite backend, proxied artifacts).

Checks what a user sees through MlflowClient: the run, its params, metric histories, tags,
artifacts (LoRA, validation grid and its CLIP scores, spec, run summary, downloadable) and the registered LoRA.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    root: Path
    proc: subprocess.Popen
    log_path: Path

    def wait_until_up(self, timeout_s: float = 90.0) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                opener.open(self.url + "/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"mlflow server did not answer at {self.url} within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port>, sqlite backend and artifact store in a temp dir (starting)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log_path = root / "server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner workers
    for key in ("NO_PROXY", "no_proxy"):
        os.environ[key] = env[key] = ",".join(filter(None, [os.environ.get(key), "127.0.0.1,localhost"]))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
             "--serve-artifacts", "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield Server(f"http://127.0.0.1:{port}", root, proc, log_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server_job(mlflow_server, ray_session, tiny_model_dir, demo_data_dir, tmp_path_factory, demo_spec, tiny_clip_dir):
    from flux_ray import job

    out = tmp_path_factory.mktemp("server_job")
    spec = demo_spec(tiny_model_dir, demo_data_dir, out, name="server-job",
                     train={"max_train_steps": STEPS, "log_every": 1, "checkpointing_steps": STEPS},
                     eval={"eval_steps_interval": 2, "validation_step_interval": STEPS, "evaluation_type": "clip",
                           "pretrained_evaluation_model_name_or_path": tiny_clip_dir},
                     tracking={"mlflow_tracking_uri": mlflow_server.url, "experiment_name": "server_test",
                               "register_model_name": "flux-lora-server-test"},
                     output={"uri": str(out / "output"), "export_formats": ["diffusers", "comfyui"]})
    job.cache(spec)  # while the server starts; the job's own cache pass then finds everything cached
    mlflow_server.wait_until_up()
    return spec, job.run(spec)


def test_run_params_tags_and_metric_histories(server_job, mlflow_server):
    from flux_ray.spec import flat_params

    spec, summary = server_job
    uri = mlflow_server.url
    assert summary["mlflow"]["tracking_uri"] == uri
    c = MlflowClient(uri)
    run = c.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "server-job"
    assert c.get_experiment(run.info.experiment_id).name == "server_test"
    params = run.data.params
    for key, value in flat_params(spec).items():
        assert params[key] == str(value)[:6000], key
    assert not [k for k in params if "secret" in k or "password" in k]
    tags = run.data.tags
    assert tags["flux_ray.flavour"] == "dev" and tags["flux_ray.datasets"] == "demo"
    assert tags["flux_ray.cache_keys"] == f"demo={summary['cache_keys']['demo']}"
    assert "mlflow.parentRunId" not in tags  # a single job is one run
    history = {name: [m.step for m in c.get_metric_history(run.info.run_id, name)]
               for name in ("train_loss", "learning_rate", "samples_per_s", "step_time_s", "eval_loss")}
    assert history["train_loss"] == list(range(1, STEPS + 1)), history
    assert history["learning_rate"] == history["samples_per_s"] == history["step_time_s"] == history["train_loss"]
    assert history["eval_loss"] == [2, 4]
    assert run.data.metrics["eval_loss"] == pytest.approx(summary["eval_loss"])


def test_artifacts_are_served_and_match_the_outputs(server_job, mlflow_server, tmp_path):
    spec, summary = server_job
    uri, server_root = mlflow_server.url, mlflow_server.root
    c = MlflowClient(uri)
    run_id = summary["mlflow"]["run_id"]
    assert c.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    top = {a.path for a in c.list_artifacts(run_id)}
    assert {"lora", "validation", "job_spec.yaml", "run_summary.json"} <= top
    assert [a.path for a in c.list_artifacts(run_id, "validation")] == [f"validation/step-{STEPS:06d}.clip_score.json",
                                                                        f"validation/step-{STEPS:06d}.png"]
    lora_files = {a.path for a in c.list_artifacts(run_id, "lora")}
    assert "lora/pytorch_lora_weights.safetensors" in lora_files and "lora/comfyui" in lora_files
    local = c.download_artifacts(run_id, "lora/pytorch_lora_weights.safetensors", str(tmp_path))
    assert open(local, "rb").read() == open(summary["lora"], "rb").read()
    summary_art = json.load(open(c.download_artifacts(run_id, "run_summary.json", str(tmp_path))))
    assert summary_art["mlflow"]["run_id"] == run_id and summary_art["steps"] == STEPS
    spec_art = open(c.download_artifacts(run_id, "job_spec.yaml", str(tmp_path))).read()
    assert "max_train_steps: 4" in spec_art
    stored = [os.path.join(d, f) for d, _, fs in os.walk(server_root / "artifacts") for f in fs]
    assert any(p.endswith("pytorch_lora_weights.safetensors") for p in stored)  # proxied into the server's store


def test_clip_score_is_logged_beside_the_validation_images(server_job, mlflow_server, tiny_clip_dir, tmp_path):
    import torch
    from PIL import Image

    from flux_ray.core.clip_score import ClipScorer

    spec, summary = server_job
    c = MlflowClient(mlflow_server.url)
    run_id = summary["mlflow"]["run_id"]
    name = "validation-128x128"  # demo.yaml's validation_prompt at its validation_resolution
    history = {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in ("clip_score",
                                                                                        f"clip_score/{name}")}
    image = Image.open(Path(spec.run_uri) / "validation" / f"step-{STEPS:06d}" / f"{name}.png")
    [direct] = ClipScorer(tiny_clip_dir, torch.device("cpu"))([image], [spec.eval.validation_prompt])
    assert direct > 0 and [s for s, _ in history["clip_score"]] == [STEPS]  # once per validation
    assert history["clip_score"][0][1] == pytest.approx(direct, abs=1e-4)  # one image: the mean is its score
    assert history[f"clip_score/{name}"][0][1] == pytest.approx(direct, abs=1e-4)
    assert summary["clip_score"] == pytest.approx(direct, abs=1e-4)
    scores = json.load(open(c.download_artifacts(run_id, f"validation/step-{STEPS:06d}.clip_score.json", str(tmp_path))))
    assert scores == pytest.approx({"clip_score": direct, f"clip_score/{name}": direct}, abs=1e-4)


def test_lora_is_registered_as_a_model_version(server_job, mlflow_server, tmp_path):
    spec, summary = server_job
    uri = mlflow_server.url
    c = MlflowClient(uri)
    reg = summary["registered_model"]
    version = c.get_model_version(reg["name"], reg["version"])
    assert version.run_id == summary["mlflow"]["run_id"]
    assert version.source.endswith("/lora")
    files = os.listdir(c.download_artifacts(version.run_id, "lora", str(tmp_path)))
    assert "pytorch_lora_weights.safetensors" in files
