"""Where a spec's paths live: inside a Ray job (FLUX_RAY_HOME) and on a multi-node cluster (no Ray needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flux_ray.placement import check_placement, unreachable_paths
from flux_ray.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
JOB_ENV = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_x"}})}


@pytest.fixture
def in_ray_job(tmp_path, monkeypatch):
    """A process that looks like a Ray job's driver: Ray's env var, cwd an unpacked working dir."""
    workdir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (workdir / "jobs").mkdir(parents=True)
    (workdir / "jobs" / "demo.yaml").write_text((REPO / "jobs" / "demo.yaml").read_text())
    home = tmp_path / "home"
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("FLUX_RAY_HOME", str(home))
    for k, v in JOB_ENV.items():
        monkeypatch.setenv(k, v)
    return workdir, home


def test_relative_outputs_and_generated_inputs_leave_the_job_working_dir(in_ray_job):
    workdir, home = in_ray_job
    spec = load_spec("jobs/demo.yaml")
    assert spec.output.uri == str(home / "flux_ray_runs" / "output")
    assert spec.cache.uri == str(home / "flux_ray_runs" / "cache")
    assert spec.model.pretrained_model_name_or_path == str(home / ".flux_ray" / "tiny-flux")
    assert spec.datasets[0].instance_data_dir == str(home / ".flux_ray" / "demo-data")
    check_placement(spec, num_nodes=1)  # one node: local paths are fine


def test_an_uploaded_input_stays_in_the_working_dir(in_ray_job, demo_data_dir):
    import shutil

    workdir, home = in_ray_job
    shutil.copytree(demo_data_dir, workdir / "data")
    spec = load_spec("jobs/demo.yaml", ["datasets.demo.instance_data_dir=./data"])
    assert spec.datasets[0].instance_data_dir == str(workdir / "data")
    assert spec.output.uri.startswith(str(home))


def test_outside_a_job_relative_paths_stay_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    spec = load_spec(REPO / "jobs" / "demo.yaml")
    assert spec.output.uri == str(tmp_path / "flux_ray_runs" / "output")


def test_remote_output_without_tracking_uri_is_refused_in_a_job(in_ray_job):
    spec = load_spec("jobs/demo.yaml", ["output.uri=s3://bucket/runs", "cache.uri=s3://bucket/cache"])
    with pytest.raises(ValueError, match=r"tracking.mlflow_tracking_uri: not set while output.uri is s3://bucket/runs"):
        check_placement(spec, num_nodes=1)
    spec.tracking.mlflow_tracking_uri = "http://127.0.0.1:5000"
    check_placement(spec, num_nodes=1)


def test_multi_node_refuses_every_local_path_naming_key_and_path(tiny_model_dir, demo_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    sets = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"datasets.demo.instance_data_dir={demo_data_dir}",
            f"output.uri={tmp_path}/out", "cache.uri=s3://b/cache", "datasets.demo.caption_strategy=auto",
            f"datasets.demo.captioner.model_name={tmp_path}/captioner", "eval.evaluation_type=clip",
            f"eval.pretrained_evaluation_model_name_or_path={tmp_path}/clip"]
    spec = load_spec(REPO / "jobs" / "demo.yaml", sets)
    with pytest.raises(ValueError) as e:
        check_placement(spec, num_nodes=2)
    msg = str(e.value)
    for key, path in [("model.pretrained_model_name_or_path", tiny_model_dir),
                      ("datasets.0.instance_data_dir", demo_data_dir), ("output.uri", f"{tmp_path}/out"),
                      ("datasets.0.captioner.model_name", f"{tmp_path}/captioner"),
                      ("eval.pretrained_evaluation_model_name_or_path", f"{tmp_path}/clip")]:
        assert f"{key}: '{path}' is a local path of the driver's node; this cluster has 2 nodes" in msg
    assert "cache.uri" not in msg and "storage.shared_paths" in msg and "s3://" in msg
    check_placement(spec, num_nodes=1)


def test_shared_paths_admit_local_paths_on_multi_node(tiny_model_dir, demo_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    roots = sorted({str(Path(p).parent) for p in (tiny_model_dir, demo_data_dir)} | {str(tmp_path)})
    sets = [f"model.pretrained_model_name_or_path={tiny_model_dir}", f"datasets.demo.instance_data_dir={demo_data_dir}",
            f"output.uri={tmp_path}/out", f"cache.uri={tmp_path}/cache", f"storage.shared_paths={json.dumps(roots)}"]
    spec = load_spec(REPO / "jobs" / "demo.yaml", sets)
    assert unreachable_paths(spec) == []
    check_placement(spec, num_nodes=2)
    with pytest.raises(SpecError, match="storage.shared_paths must be absolute"):
        load_spec(REPO / "jobs" / "demo.yaml", sets[:-1] + ['storage.shared_paths=["mnt/x"]'])
