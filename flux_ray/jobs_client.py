"""`flux-ray submit|status|logs|stop`: Ray's Jobs API with a runtime env built from the spec."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from flux_ray.job_home import DEFAULT_HOME, HOME_ENV
from flux_ray.placement import tracking_store_problem
from flux_ray.spec import load_spec

# Environment variables forwarded to the job by name; values never printed.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_PROFILE", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "HF_HUB_OFFLINE")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_job_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster's Jobs API")
    p.add_argument("spec")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_ADDRESS")),
                   help="Ray dashboard/Jobs address, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's runtime env")
    p.add_argument("--image-uri", default=None, help="container image for the job (instead of pip)")
    p.add_argument("--command", default="run", choices=["run", "train", "cache", "tune"])
    p.add_argument("--no-wait", action="store_true", help="return after submission")
    p.add_argument("--submission-id", default=None)
    for name, text in [("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_ADDRESS")))
        if name == "logs":
            p.add_argument("--follow", action="store_true")


def use_token_auth_if_available() -> None:
    """Ray 2.60 clients send the cluster token only with RAY_AUTH_MODE=token: turn it on when a token
    is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the user said nothing."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
            or (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise ValueError("no Ray address: pass --address http://HOST:8265 or set RAY_ADDRESS")
    use_token_auth_if_available()
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        if "401" in str(e) or "403" in str(e) or "authentication" in str(e).lower():
            raise ValueError(f"{address} refused the connection ({e}): the cluster uses token auth; set "
                             "RAY_AUTH_TOKEN or put the token in ~/.ray/auth_token (see cluster/README.md)") from e
        raise


def runtime_env(spec, working_dir: str, pip: list[str], image_uri: str | None) -> dict:
    """Working dir, requirements or image, and env vars by reference (forwarded from this shell)."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if spec.storage.aws_endpoint_url:
        env_vars["AWS_ENDPOINT_URL"] = spec.storage.aws_endpoint_url
    renv: dict = {"working_dir": working_dir, "env_vars": env_vars,
                  "excludes": [".venv", ".git", "flux_ray_runs", ".flux_ray", ".whl", "*.safetensors"]}
    if image_uri:
        renv["image_uri"] = image_uri
    elif pip:
        renv["pip"] = list(pip)
    return renv


def relative_outputs(spec_path: str, overrides: list[str]) -> list[str]:
    """Output keys the spec gives as relative paths (read before load_spec makes them absolute)."""
    from flux_ray.job_home import is_relative_local
    from flux_ray.spec import parse_override

    import yaml

    data = yaml.safe_load(Path(spec_path).read_text()) or {}
    values = {"output.uri": (data.get("output") or {}).get("uri", "./flux_ray_runs/output"),
              "cache.uri": (data.get("cache") or {}).get("uri", "./flux_ray_runs/cache")}
    for item in overrides:
        keys, value = parse_override(item)
        if ".".join(keys) in values:
            values[".".join(keys)] = value
    return [k for k, v in values.items() if isinstance(v, str) and is_relative_local(v)]


def output_lines(logs: str) -> list[str]:
    """The lines a job prints about where its outputs are (`flux-ray run|train` on the cluster), and its progress:
    the latest progress line (flux_ray/progress.py) and the closing summary once there is one."""
    from flux_ray.progress import PROGRESS_LINE, SUMMARY_PREFIX

    lines = logs.splitlines(keepends=True)
    progress = [line for line in lines if PROGRESS_LINE.match(line)]
    shown = [line for line in lines if line.startswith(("outputs:", "LoRA:", "cache:", "MLflow:", "published:",
                                                        "summary:", SUMMARY_PREFIX))]
    if progress and not any(line.startswith(SUMMARY_PREFIX) for line in shown):
        shown.insert(1 if shown and shown[0].startswith("outputs:") else 0, progress[-1])
    return shown


def describe_env(renv: dict) -> dict:
    """The runtime env as printed: env var values masked."""
    return {**renv, "env_vars": {k: "***" for k in renv.get("env_vars", {})}}


def submit(args) -> int:
    spec = load_spec(args.spec, args.overrides)  # fails here, before anything reaches the cluster
    problem = tracking_store_problem(spec)
    if problem:
        raise ValueError(problem)
    spec_rel = os.path.relpath(Path(args.spec).resolve(), Path(args.working_dir).resolve())
    if spec_rel.startswith(".."):
        raise ValueError(f"the spec {args.spec} must lie inside --working-dir {args.working_dir} to be uploaded")
    sets = " ".join(f"--set {shlex.quote(o)}" for o in args.overrides)
    entrypoint = f"flux-ray {args.command} {shlex.quote(spec_rel)} {sets}".strip()
    renv = runtime_env(spec, args.working_dir, args.pip, args.image_uri)
    client = job_client(args.address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=renv, submission_id=args.submission_id,
                               metadata={"flux_ray.job_name": spec.name})
    print(f"submitted {job_id}: {entrypoint}\nruntime env: {describe_env(renv)}")
    relative = relative_outputs(args.spec, args.overrides)
    if relative:
        print(f"relative {', '.join(relative)} resolve on the cluster under ${HOME_ENV} (default {DEFAULT_HOME} "
              "on the node running the job), not in the job's working directory, which Ray deletes")
    if args.no_wait:
        return 0
    status = wait(client, job_id)
    print(f"{job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def wait(client, job_id: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0, echo_logs: bool = True) -> str:
    start, shown = time.time(), 0
    while time.time() - start < timeout_s:
        raw = client.get_job_status(job_id)
        status = str(getattr(raw, "value", raw))
        if echo_logs:
            logs = client.get_job_logs(job_id)
            sys.stdout.write(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s")


def run_job_command(args) -> int:
    if args.cmd == "submit":
        return submit(args)
    client = job_client(args.address)
    if args.cmd == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status} {info.message or ''}".rstrip())
        print("".join(output_lines(client.get_job_logs(args.job_id))), end="")
    elif args.cmd == "logs":
        if args.follow:
            wait(client, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
    elif args.cmd == "stop":
        print(f"{args.job_id}: stop requested" if client.stop_job(args.job_id) else f"{args.job_id}: not running")
    return 0
