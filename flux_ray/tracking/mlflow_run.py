"""MLflow runs for jobs and sweeps, driver side only (workers never open runs)."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from flux_ray.spec import flat_params, spec_to_yaml

MAX_PARAM_LEN = 6000
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def tracking_uri(spec) -> str:
    """The spec's URI, or a local sqlite store under the output directory (or ./flux_ray_runs for s3 output)."""
    if spec.tracking.mlflow_tracking_uri:
        return spec.tracking.mlflow_tracking_uri
    root = spec.output.uri if "://" not in spec.output.uri else "./flux_ray_runs"
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(c, spec, uri: str) -> str:
    exp = c.get_experiment_by_name(spec.tracking.experiment_name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    return c.create_experiment(spec.tracking.experiment_name, artifact_location=location)


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(spec, cache_keys: dict | None = None, extra: dict | None = None) -> dict:
    tags = {"flux_ray.flavour": spec.model.model_flavour, "flux_ray.datasets": ",".join(d.id for d in spec.enabled_datasets()),
            "flux_ray.job_name": spec.name}
    if cache_keys:
        tags["flux_ray.cache_keys"] = ",".join(f"{k}={v}" for k, v in sorted(cache_keys.items()))
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return {**tags, **(extra or {})}


def start_run(spec, *, run_name: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None, uri: str | None = None) -> tuple[str, str]:
    """Create a run with the flattened effective spec as params; returns (tracking_uri, run_id)."""
    uri = uri or tracking_uri(spec)
    c = client(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(_experiment_id(c, spec, uri), run_name=run_name or spec.name, tags=all_tags)
    log_params(uri, run.info.run_id, flat_params(spec))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "job_spec.yaml"
        p.write_text(spec_to_yaml(spec, redact=True))
        c.log_artifact(run.info.run_id, str(p))
    return uri, run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


def log_artifact(uri: str, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, local_path, artifact_path)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def log_storage_file(uri: str, run_id: str, file_uri: str, storage_spec, artifact_path: str) -> None:
    """Log a file that lives at a storage URI (local or s3) as an artifact."""
    from flux_ray import storage

    if not storage.is_s3(file_uri):  # a local file is logged where it is: one copy, into the artifact store
        log_artifact(uri, run_id, storage.resolve(file_uri, storage_spec)[1], artifact_path)
        return
    name = file_uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, name)
        Path(local).write_bytes(storage.read_bytes(file_uri, storage_spec))
        log_artifact(uri, run_id, local, artifact_path)


def redact(value) -> str:
    """A param value without the user:password@ part of any URL in it."""
    return _URL_USERINFO.sub("***@", str(value))


def log_params(uri: str, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    c = client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    from mlflow.entities import RunTag

    if tags:
        client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def run_status(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.status


def log_run_outputs(uri: str, run_id: str, spec, summary_uri: str | None = None) -> None:
    """The run's LoRA files (every export format, under lora/) and run_summary.json as artifacts."""
    from flux_ray import storage

    lora_uri = storage.join(spec.run_uri, "lora")
    for f in storage.list_files(lora_uri, spec.storage):
        sub = os.path.dirname(f.rel_path)
        log_storage_file(uri, run_id, f.uri, spec.storage, "lora/" + sub if sub else "lora")
    if summary_uri:
        log_storage_file(uri, run_id, summary_uri, spec.storage, None)


def register_lora(uri: str, run_id: str, model_name: str, artifact_path: str = "lora") -> str:
    """Register a run's logged LoRA folder as a new version of an MLflow registered model; returns the version."""
    c = client(uri)
    if not c.search_registered_models(filter_string=f"name = '{model_name}'"):
        c.create_registered_model(model_name, description="Flux LoRA adapters trained by flux_ray")
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + artifact_path
    for v in c.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'"):
        if v.source == source:
            return str(v.version)  # already registered (a rerun of a finished sweep)
    return str(c.create_model_version(model_name, source=source, run_id=run_id).version)
