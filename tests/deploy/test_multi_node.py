"""A 2-node Ray cluster on one machine with no shared disk (#17): the second node runs in its own mount
namespace with a private tmpfs over /tmp, so it sees none of the head's test files (pytest's tmp dirs, the
head's $FLUX_RAY_HOME, the head's node cache). Both reach moto S3 and an `mlflow server` (sqlite on the
server's side, artifacts in S3) over 127.0.0.1. README "Running on a cluster" shows the same commands."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                 reason="the second node needs a mount namespace (root + unshare)")]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CPUS_PER_NODE = 3
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # as conftest's s3_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(cluster, code: str, timeout: float = 120) -> str:
    """Run `code` in a fresh driver connected to the cluster; returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=cluster["env"], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args[:4]} exited with {proc.returncode}"
        try:
            opener.open(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(url)


def start_worker_node(cluster, name: str) -> subprocess.Popen:
    """`ray start --address` in a private mount namespace: tmpfs over /tmp (its Ray session dir, its node cache)."""
    resources = json.dumps({name: 1, "trial_slot": 1})
    inner = (f"mount -t tmpfs tmpfs /tmp && exec {BIN}/ray start --address {cluster['gcs']} --node-ip-address 127.0.0.1 "
             f"--num-cpus {CPUS_PER_NODE} --resources '{resources}' --dashboard-agent-listen-port {_free_port()} "
             "--disable-usage-stats --block")
    env = dict(cluster["env"], FLUX_RAY_NODE_CACHE="/tmp/flux_ray_node_cache")
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> None:
    """`ray start --block` stops its node's processes on SIGTERM; the group is killed if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for_nodes(cluster, n: int, timeout_s: float = 180) -> None:
    _probe(cluster, f"""
        import time, ray
        ray.init()
        deadline = time.time() + {timeout_s}
        while sum(x["Alive"] for x in ray.nodes()) < {n}:
            assert time.time() < deadline, ray.nodes()
            time.sleep(0.5)
    """, timeout=timeout_s + 60)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")  # under /tmp: invisible to the second node
    gcs_port, dash, mlflow_port = _free_port(), _free_port(), _free_port()
    env = dict(os.environ, **S3_ENV, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ['PATH']}",
               PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
               AWS_ENDPOINT_URL=s3_server.endpoint, MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint,
               FLUX_RAY_HOME=str(root / "home"), FLUX_RAY_NODE_CACHE=str(root / "node_cache_head"),
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60)
    s3_server.create_bucket("mlflow")
    procs = {}
    with open(root / "mlflow.log", "w") as log:
        procs["mlflow"] = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", "s3://mlflow/artifacts",
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    procs["head"] = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--num-cpus", str(CPUS_PER_NODE), "--resources", json.dumps({"node_a": 1, "trial_slot": 1}), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port",
         str(_free_port()), "--ray-client-server-port", str(_free_port()), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    info = {"gcs": f"127.0.0.1:{gcs_port}", "address": f"http://127.0.0.1:{dash}", "root": root, "procs": procs,
            "mlflow": f"http://127.0.0.1:{mlflow_port}", "s3": s3_server, "env": dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs_port}")}
    try:
        _wait_http(info["address"], procs["head"])
        procs["node_b"] = start_worker_node(info, "node_b")
        wait_for_nodes(info, 2)
        _wait_http(info["mlflow"] + "/health", procs["mlflow"])
        yield info
    finally:
        for name in ("node_b", "node_b2", "head", "mlflow"):
            if name in procs:
                _stop(procs[name])
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(gcs_port) in current.read_text():
            current.unlink()


@pytest.fixture(scope="module")
def s3_inputs(cluster, tiny_model_dir, demo_data_dir):
    """The tiny model (a diffusers folder) and the demo images in S3: what every node can read."""
    from flux_ray import storage

    s3 = cluster["s3"]
    bucket = s3.create_bucket("multinode")
    storage.copy_dir(tiny_model_dir, f"{bucket}/models/tiny-flux", s3.storage)
    storage.copy_dir(demo_data_dir, f"{bucket}/data/demo", s3.storage)
    return bucket


def _spec(cluster, bucket: str, name: str, **sections) -> dict:
    data = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    data["name"] = name
    data["model"].update(pretrained_model_name_or_path=f"{bucket}/models/tiny-flux", make_tiny_if_missing=False)
    data["datasets"] = [{"id": "demo", "type": "s3", "aws_bucket_name": bucket.removeprefix("s3://"),
                         "aws_data_prefix": "data/demo", "caption_strategy": "textfile", "resolution": 64,
                         "resolution_type": "pixel_area"}]
    data["storage"] = {"aws_endpoint_url": cluster["s3"].endpoint}
    data["cache"].update(uri=f"{bucket}/cache", num_vae_actors=2)
    data["output"]["uri"] = f"{bucket}/runs"
    data["tracking"] = {"mlflow_tracking_uri": cluster["mlflow"], "experiment_name": "multinode"}
    data["train"].update(max_train_steps=4, checkpointing_steps=2, log_every=2)
    data["eval"].update(eval_steps_interval=None, validation_step_interval=4, validation_resolution="64x64",
                        validation_num_inference_steps=2)
    data["scaling"] = {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}
    for key, value in sections.items():
        data[key].update(value) if isinstance(data.get(key), dict) else data.__setitem__(key, value)
    return data


def test_the_second_node_cannot_see_the_heads_files(cluster):
    out = _probe(cluster, f"""
        import os, ray
        ray.init()
        where = lambda: (os.path.exists({str(cluster['root'])!r}), os.environ.get("FLUX_RAY_NODE_CACHE"))
        print(ray.get(ray.remote(resources={{"node_a": 0.01}})(where).remote()),
              ray.get(ray.remote(resources={{"node_b": 0.01}})(where).remote()))
    """)
    assert out.split() == ["(True,", f"'{cluster['root']}/node_cache_head')", "(False,", "'/tmp/flux_ray_node_cache')"]


def test_local_paths_fail_before_any_work(cluster, tiny_model_dir, demo_data_dir, tmp_path):
    spec = tmp_path / "local.yaml"
    data = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    data["model"].update(pretrained_model_name_or_path=tiny_model_dir, make_tiny_if_missing=False)
    data["datasets"][0].update(instance_data_dir=demo_data_dir, make_demo_if_missing=False)
    data["cache"]["uri"] = str(tmp_path / "cache")
    data["output"]["uri"] = str(tmp_path / "output")
    spec.write_text(yaml.safe_dump(data))
    proc = subprocess.run([str(BIN / "flux-ray"), "run", str(spec)], env=cluster["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    for key, path in [("model.pretrained_model_name_or_path", tiny_model_dir),
                      ("datasets.0.instance_data_dir", demo_data_dir), ("cache.uri", tmp_path / "cache"),
                      ("output.uri", tmp_path / "output")]:
        assert f"{key}: '{path}' is a local path of the driver's node; this cluster has 2 nodes" in proc.stderr
    assert "storage.shared_paths" in proc.stderr and "s3://" in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "output").exists()  # no work was done


def test_s3_everywhere_on_two_nodes_submitted_from_a_client_without_files(cluster, s3_inputs, tmp_path):
    """`flux-ray submit` of an S3-only spec (model in S3) from a directory that holds only the spec: cache actors and
    the 2 training workers on both nodes, checkpoints, LoRA and run_summary.json in S3, metrics and
    validation images in the MLflow server, the model fetched once per node."""
    from mlflow import MlflowClient

    from flux_ray import storage

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "job.yaml").write_text(yaml.safe_dump(_spec(cluster, s3_inputs, "s3-run")))
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", "job.yaml", "--address", cluster["address"]],
                          cwd=client_dir, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    run = f"{s3_inputs}/runs/s3-run"
    st = cluster["s3"].storage
    summary = storage.read_json(f"{run}/run_summary.json", st)
    assert summary["steps"] == 4 and summary["lora"].startswith(run)
    assert storage.exists(summary["lora"], st)
    assert [f for f in storage.list_files(run, st) if "/checkpoint_" in f.uri and f.uri.endswith(".safetensors")]
    mlflow_run = MlflowClient(cluster["mlflow"]).get_run(summary["mlflow"]["run_id"])
    assert mlflow_run.info.status == "FINISHED" and "train_loss" in mlflow_run.data.metrics
    artifacts = storage.list_files("s3://mlflow/artifacts", st)
    assert any(f.uri.endswith(".png") for f in artifacts)  # validation images, stored by the server in S3
    nodes = json.loads(_probe(cluster, """
        import json, ray
        from ray.util.state import list_actors, list_tasks
        ray.init()
        ids = {n["NodeID"]: [k for k in n["Resources"] if k.startswith("node_")][0] for n in ray.nodes() if n["Alive"]}
        by_class = {}
        for a in list_actors(detail=True, limit=10000):
            by_class.setdefault(a.class_name, set()).add(ids.get(a.node_id, "?"))
        for t in list_tasks(detail=True, limit=10000):
            if "decode_row" in t.name:
                by_class.setdefault("decode_row tasks", set()).add(ids.get(t.node_id, "?"))
        print(json.dumps({k: sorted(v) for k, v in by_class.items()}))
    """).strip().splitlines()[-1])
    assert nodes.get("RayTrainWorker") == ["node_a", "node_b"], nodes
    cache_work = sorted({n for cls, v in nodes.items() if "Encoder" in cls or "decode_row" in cls for n in v} - {"?"})
    assert cache_work == ["node_a", "node_b"], nodes  # decode tasks and encoder actors ran on both nodes
    copies = _probe(cluster, """
        import os, ray
        def copies():
            root = os.environ["FLUX_RAY_NODE_CACHE"]
            return sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, ".complete")))
        ray.init()
        print(len(ray.get(ray.remote(resources={"node_a": 0.01})(copies).remote())),
              len(ray.get(ray.remote(resources={"node_b": 0.01})(copies).remote())))
    """).split()
    assert copies == ["1", "1"]  # one model copy per node, whatever the number of actors and workers there


def test_export_a_run_in_s3_from_a_client_without_files(cluster, s3_inputs, tmp_path):
    """`flux-ray export s3://.../run` (the run of the test above): LoRA and spec come from S3 and the MLflow server."""
    from safetensors.torch import load_file

    from flux_ray import storage

    run = f"{s3_inputs}/runs/s3-run"
    if not storage.exists(f"{run}/run_summary.json", cluster["s3"].storage):
        pytest.skip("needs the S3 run of test_s3_everywhere_on_two_nodes_submitted_from_a_client_without_files")
    proc = subprocess.run([str(BIN / "flux-ray"), "export", run, "--format", "comfyui"], cwd=tmp_path,
                          env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = list((tmp_path / "s3-run-comfyui").rglob("*.safetensors"))
    assert files and load_file(str(files[0]))
    assert any(k.startswith("diffusion_model.") or k.startswith("lora_unet_") for k in load_file(str(files[0])))


def test_a_two_trial_sweep_runs_its_trials_on_both_nodes_from_one_cache(cluster, s3_inputs, tmp_path):
    """Each node has one `trial_slot`; each trial's worker needs one, so 2 concurrent trials use both nodes. The
    trials have one worker each, so each trains in its Tune actor (``ImplicitFunc``, tune/local_trial.py), which
    holds the worker's resources. The cache is the one the S3 run above wrote (same model URI, data and
    resolution): nothing is encoded."""
    from flux_ray import storage

    data = _spec(cluster, s3_inputs, "s3-sweep")
    data["eval"].update(validation_step_interval=None, eval_steps_interval=2, eval_split_fraction=0.15)
    data["train"]["max_train_steps"] = 8  # trials long enough to overlap on a loaded machine
    data["scaling"] = {"num_workers": 1, "resources_per_worker": {"CPU": 1, "trial_slot": 1}}
    data["tune"] = {"param_space": {"train.learning_rate": {"type": "grid", "values": [1.0e-3, 3.0e-3]}},
                    "num_samples": 1, "metric": "eval_loss", "mode": "min", "scheduler": "fifo",
                    "max_concurrent_trials": 2}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", "job.yaml", "--address", cluster["address"], "--command",
                           "tune", "--submission-id", "flux-ray-sweep"], cwd=tmp_path, env=cluster["env"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = storage.read_json(f"{s3_inputs}/runs/s3-sweep/sweep_summary.json", cluster["s3"].storage)
    assert not summary["interrupted"] and len(summary["trials"]) == 2
    nodes = _probe(cluster, f"""
        import ray
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors
        job_id = JobSubmissionClient({cluster["address"]!r}).get_job_info("flux-ray-sweep").job_id
        ray.init()
        ids = {{n["NodeID"]: [k for k in n["Resources"] if k.startswith("node_")][0] for n in ray.nodes() if n["Alive"]}}
        print(sorted(ids.get(a.node_id, "?") for a in list_actors(filters=[("job_id", "=", job_id)], detail=True,
                                                                  limit=10000) if a.class_name in ("RayTrainWorker", "ImplicitFunc")))
    """).strip().splitlines()[-1]
    # Two trials whose workers ran at the same time held both nodes' single trial_slot. On a loaded machine a tiny
    # trial can finish before the other trial's actor asks for its slot: the second trial may then run on the same
    # node, or in the same (reused) actor. Each worker's span: from its entry (``worker_started_at``, first report)
    # to its last report.
    from mlflow import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    spans = []
    for t in summary["trials"]:
        started = client.get_metric_history(t["mlflow_run_id"], "worker_started_at")
        last = max(m.timestamp for m in client.get_metric_history(t["mlflow_run_id"], "train_loss")) / 1000
        spans.append((started[0].value, last))
    overlapped = max(a for a, _ in spans) < min(b for _, b in spans)
    assert nodes == "['node_a', 'node_b']" or (not overlapped and nodes != "[]"), (nodes, spans)
    import re

    assert re.search(r"cache demo: \d+ usable, 0 encoded now", proc.stdout), proc.stdout[-3000:]  # one cache, read


def _raylet_of(proc: subprocess.Popen) -> int:
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if child.name() == "raylet":
            return child.pid
    raise LookupError(f"no raylet under pid {proc.pid}")


def test_a_node_dies_mid_training_and_the_run_resumes_from_s3(cluster, s3_inputs, tmp_path):
    """SIGKILL of the second node's raylet (the node dies, not one worker); with scaling.max_failures and a
    replacement node, Train restarts both workers and they resume from the newest checkpoint in S3."""
    from flux_ray import storage

    steps = 60  # long enough that the kill, right after the first checkpoint, lands mid-training on a quiet machine
    data = _spec(cluster, s3_inputs, "s3-resume")
    data["train"].update(max_train_steps=steps, checkpointing_steps=2)
    data["eval"]["validation_step_interval"] = None
    # One failure is the node's death. Under a loaded 2-core machine Ray Train 2.60 has also lost a worker of the
    # restarted group to "placement group removed" (the dead node's group being cleaned up late), so a second
    # restart is allowed; the test still demands that the run resumes from an S3 checkpoint, never from step 0.
    data["scaling"]["max_failures"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    proc = subprocess.run([str(BIN / "flux-ray"), "submit", "job.yaml", "--address", cluster["address"], "--no-wait",
                           "--submission-id", "flux-ray-node-death"], cwd=tmp_path, env=cluster["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run, st = f"{s3_inputs}/runs/s3-resume", cluster["s3"].storage
    deadline = time.time() + 400
    while not any(f.rel_path.endswith("trainer_state.json") for f in storage.list_files(run, st)):
        assert time.time() < deadline, "no checkpoint in S3"
        time.sleep(0.5)
    os.kill(_raylet_of(cluster["procs"]["node_b"]), signal.SIGKILL)
    cluster["procs"]["node_b2"] = start_worker_node(cluster, "node_b")  # the replacement, same custom resource
    out = _probe(cluster, f"""
        import json, time
        from ray.job_submission import JobSubmissionClient
        client, deadline = JobSubmissionClient({cluster["address"]!r}), time.time() + 500
        while (status := str(client.get_job_status("flux-ray-node-death").value)) not in ("SUCCEEDED", "FAILED"):
            assert time.time() < deadline, client.get_job_logs("flux-ray-node-death")[-4000:]
            time.sleep(1)
        print(json.dumps([status, client.get_job_logs("flux-ray-node-death")]))
    """, timeout=600)
    status, logs = json.loads(out.strip().splitlines()[-1])
    assert status == "SUCCEEDED", logs[-4000:]
    summary = storage.read_json(f"{run}/run_summary.json", st)
    assert summary["steps"] == steps
    resumed = [int(x) for x in __import__("re").findall(r"rank \d resumes at step (\d+)", logs)]
    assert resumed and min(resumed) >= 2, logs[-4000:]  # restarted from a checkpoint, not from step 0
