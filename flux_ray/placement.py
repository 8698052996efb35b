"""Where a spec's paths may live on the cluster it runs on; checked on the driver before any work.

Policy (README "Running on a cluster"):
- one node (embedded Ray, a one-node head): every process sees the driver's disk; local paths are fine.
- several alive nodes: every local path the job reads or writes (data, cache, output, model, LoRA and
  prompt inputs, a file MLflow store) must be an `s3://` URI, lie under a directory declared in
  `storage.shared_paths` (mounted by every node), or, for inputs, lie in the job's uploaded working
  directory (Ray unpacks it on every node at the same path). Otherwise the job fails naming each key.
- inside a Ray job or on several nodes, `output.uri` remote with no `tracking.mlflow_tracking_uri` is
  refused: the default sqlite file would be written on the head, which an ephemeral head loses.
"""
from __future__ import annotations

import os
from pathlib import Path

from flux_ray.job_home import ray_job_submission_id

UPLOAD_MARK = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep
REMEDY = ("use an s3:// URI, a directory every node mounts declared in storage.shared_paths, or (small input "
          "files) put it in the job's working directory, which Ray uploads to every node")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _local(path: str | None) -> bool:
    return bool(path) and "://" not in path and (path.startswith(("/", ".", "~")) or os.path.exists(path))


def local_paths(spec) -> list[tuple[str, str, bool]]:
    """(dotted key, path, is_input) for every local path of the spec that Ray workers open."""
    m, out = spec.model, []
    for key in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path",
                "pretrained_vae_model_name_or_path", "assistant_lora_path"):
        out.append((f"model.{key}", getattr(m, key), True))
    for i, d in enumerate(spec.datasets):
        if d.disabled:
            continue
        if d.type == "local":
            out.append((f"datasets.{i}.instance_data_dir", d.instance_data_dir, True))
        if d.parquet:
            out.append((f"datasets.{i}.parquet.path", d.parquet.path, True))
        if d.caption_strategy == "auto":  # the captioner actors load it on their nodes
            out.append((f"datasets.{i}.captioner.model_name", d.captioner.model_name, True))
    out += [("cache.uri", spec.cache.uri, False), ("output.uri", spec.output.uri, False),
            ("lora.init_lora", spec.lora.init_lora, True), ("eval.user_prompt_library", spec.eval.user_prompt_library, True)]
    if spec.eval.evaluation_type == "clip":  # rank 0 loads it, on whichever node it runs
        out.append(("eval.pretrained_evaluation_model_name_or_path", spec.eval.pretrained_evaluation_model_name_or_path,
                    True))
    if spec.train.resume_from_checkpoint not in (None, "latest"):
        out.append(("train.resume_from_checkpoint", spec.train.resume_from_checkpoint, True))
    uri = spec.tracking.mlflow_tracking_uri or ""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix):
            out.append(("tracking.mlflow_tracking_uri", "/" + uri.removeprefix(prefix).lstrip("/"), False))
    return [(k, p, inp) for k, p, inp in out if _local(p)]


def _under(path: str, roots: list[str]) -> bool:
    p = str(Path(path).expanduser().resolve())
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def unreachable_paths(spec, cwd: str | None = None) -> list[tuple[str, str]]:
    """Local paths that a worker on another node cannot see."""
    cwd = cwd or os.getcwd()
    upload = [cwd] if UPLOAD_MARK in cwd + os.sep else []
    bad = []
    for key, path, is_input in local_paths(spec):
        if _under(path, spec.storage.shared_paths) or (is_input and _under(path, upload)):
            continue
        bad.append((key, path))
    return bad


def tracking_store_problem(spec) -> str | None:
    if spec.tracking.mlflow_tracking_uri or "://" not in spec.output.uri:
        return None
    return (f"tracking.mlflow_tracking_uri: not set while output.uri is {spec.output.uri}: the default MLflow "
            "store would be a sqlite file on the head node, lost with an ephemeral head (or a Ray job's working "
            "directory); set it to an MLflow server (http://HOST:5000) or a database every node can reach")


def check_placement(spec, num_nodes: int | None = None) -> None:
    """Raise ValueError, naming every key, when the spec cannot run where this driver runs."""
    in_job = ray_job_submission_id() is not None
    num_nodes = alive_nodes() if num_nodes is None else num_nodes
    problems = []
    if in_job or num_nodes > 1:
        problem = tracking_store_problem(spec)
        if problem:
            problems.append(problem)
    if num_nodes > 1:
        problems += [f"{key}: {path!r} is a local path of the driver's node; this cluster has {num_nodes} nodes "
                     f"and their workers cannot see it: {REMEDY}" for key, path in unreachable_paths(spec)]
    if problems:
        raise ValueError("the job cannot run on this cluster:\n  " + "\n  ".join(problems))
