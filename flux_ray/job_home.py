"""Where a relative path lives when the spec runs inside a Ray job (`flux-ray submit`, `ray job submit`).

A Ray job's driver runs in its unpacked working directory
(`<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes when it
garbage-collects the package or the session ends. Relative *outputs* (`output.uri`, `cache.uri`, the
default MLflow store under the output) and *generated inputs* (`model.make_tiny_if_missing`,
`datasets.N.make_demo_if_missing` at a path that is not in the upload) would be lost with it, so
inside a job they resolve against a stable directory on the node that runs the driver:
`$FLUX_RAY_HOME`, default `~/flux_ray`. Relative inputs that exist in the uploaded working dir stay
where they are (a runtime_env upload is how small inputs reach a job).

Detection: Ray's job supervisor starts every job entrypoint with `RAY_JOB_CONFIG_JSON_ENV_VAR`
holding `{"metadata": {"job_submission_id": ...}}` (ray/dashboard/modules/job/job_supervisor.py,
`_get_driver_env_vars`, Ray 2.60); Ray's workers do not inherit it, only the driver does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENV = "FLUX_RAY_HOME"
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray._private.runtime_env.constants
DEFAULT_HOME = "~/flux_ray"


def ray_job_submission_id() -> str | None:
    """The Jobs API submission id when this process is a Ray job's driver, else None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    return meta.get("job_submission_id") or None


def flux_ray_home() -> Path:
    """The stable root for a job's relative outputs: $FLUX_RAY_HOME or ~/flux_ray (absolute)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def output_base() -> Path | None:
    """The directory relative outputs resolve against: FLUX_RAY_HOME inside a Ray job, else None (cwd)."""
    return flux_ray_home() if ray_job_submission_id() else None


def is_relative_local(path: str | None) -> bool:
    return bool(path) and "://" not in path and not path.startswith(("/", "~"))


def resolve_output(path: str, base: Path | None) -> str:
    """A relative local output path against `base` (None: the working directory), absolute."""
    if base is None or not is_relative_local(path):
        return path
    return str((base / path).resolve())


def resolve_generated(path: str | None, base: Path | None) -> str | None:
    """A generated input (tiny model, demo images): from the upload when it is there, else under `base`."""
    if base is None or not is_relative_local(path) or os.path.exists(path):
        return path
    return str((base / path).resolve())
