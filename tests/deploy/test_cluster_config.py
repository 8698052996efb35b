"""cluster/: the launcher YAML against Ray's own schema, the Ray pins, the Dockerfile, local-head.sh."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO_ROOT / "cluster"
LOCAL_HEAD = CLUSTER_DIR / "local-head.sh"


def ray_cluster_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and `\\` continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return out


def pinned_ray_versions(text: str) -> set[str]:
    return set(re.findall(r"ray(?:\[[^\]]*\])?==([0-9][\w.]*)", text))


# ---------------------------------------------------------------- cluster/aws-gpu.yaml

def test_aws_config_matches_ray_schema(aws_cluster_config):
    jsonschema.validate(aws_cluster_config, ray_cluster_schema())


def test_aws_config_passes_ray_up_checks(aws_cluster_config):
    """What `ray up` runs before it talks to AWS: defaults filled in, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws_cluster_config)))


@pytest.mark.parametrize("path, typo", [((), "max_worker"), (("available_node_types", "gpu-l40s"), "min_worker"),
                                        (("docker",), "imagee"), (("provider",), None)])
def test_ray_schema_rejects_typos(aws_cluster_config, path, typo):
    config = copy.deepcopy(aws_cluster_config)
    node = config
    for part in path:
        node = node[part]
    if typo is None:
        del node["type"]  # provider.type is required
    else:
        node[typo] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_cluster_schema())


def test_aws_node_types(aws_cluster_config):
    types = aws_cluster_config["available_node_types"]
    head = types[aws_cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    for name, node_type in gpu_types.items():
        assert node_type["min_workers"] == 0 < node_type["max_workers"], f"{name}: scale from 0"
        assert node_type["max_workers"] <= aws_cluster_config["max_workers"], name


def test_aws_token_auth_wiring(aws_cluster_config):
    """Every node runs `ray start` with RAY_AUTH_MODE=token and gets the client's token file."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    token_file = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert aws_cluster_config["file_mounts"].get(token_file) == token_file, \
        f"file_mounts must ship {token_file} (Ray's default token path) to every node"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws_cluster_config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), \
            f"{key}: `ray start` turns token auth on only with RAY_AUTH_MODE=token"
    assert "-e RAY_AUTH_MODE=token" in aws_cluster_config["docker"]["run_options"]


def test_aws_file_mounts_exist(aws_cluster_config):
    for remote, local in aws_cluster_config["file_mounts"].items():
        if local.startswith("~/.ray/"):
            continue  # the token: created on the client by `ray get-auth-token --generate`
        assert (REPO_ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repo"


# ---------------------------------------------------------------- one Ray version everywhere

def test_ray_pins_agree(ray_pin, aws_cluster_config):
    setup = "\n".join(aws_cluster_config["setup_commands"])
    assert pinned_ray_versions(setup) == {ray_pin}, f"aws-gpu.yaml setup_commands pin {pinned_ray_versions(setup)}"
    assert f"'{ray_pin}'" in setup, "aws-gpu.yaml setup_commands should assert the node's ray version"
    assert importlib.metadata.version("ray") == ray_pin, \
        f"this environment has ray {importlib.metadata.version('ray')}; clients must match the cluster's {ray_pin}"


def test_dockerfile_pins_pyproject_ray(ray_pin):
    instructions = dockerfile_instructions(CLUSTER_DIR / "Dockerfile")
    froms = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert len(froms) == 1, "one build stage expected"
    pre_from_args = dict(a.split("=", 1) for kw, a in instructions[: froms[0]] if kw == "ARG" and "=" in a)
    assert pre_from_args.get("RAY_VERSION") == ray_pin, \
        f"Dockerfile ARG RAY_VERSION={pre_from_args.get('RAY_VERSION')} != pyproject's ray=={ray_pin}"
    base = instructions[froms[0]][1]
    assert re.match(r"rayproject/ray:\$\{RAY_VERSION\}-", base), f"base image {base} must be tagged by RAY_VERSION"
    after = instructions[froms[0] + 1:]
    assert ("ARG", "RAY_VERSION") in after, "re-declare ARG RAY_VERSION after FROM to use it in RUN"
    runs = " ".join(a for kw, a in after if kw == "RUN")
    assert "ray[train,tune,data,default]==${RAY_VERSION}" in runs, "pip install must pin ray==${RAY_VERSION}"
    assert "ray.__version__ == '${RAY_VERSION}'" in runs, "the build should assert the installed ray version"


def test_dockerfile_copies_existing_paths():
    for kw, args in dockerfile_instructions(CLUSTER_DIR / "Dockerfile"):
        if kw != "COPY":
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for src in sources:
            assert (REPO_ROOT / src).exists(), f"Dockerfile COPY {src}: not in the repo (the build would fail)"


# ---------------------------------------------------------------- cluster/local-head.sh

def run_local_head(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_HEAD), *args], capture_output=True, text=True, timeout=20,
                          env={**os.environ, **env})


def test_local_head_script_is_valid_bash():
    assert os.access(LOCAL_HEAD, os.X_OK), f"chmod +x {LOCAL_HEAD}"
    subprocess.run(["bash", "-n", str(LOCAL_HEAD)], check=True)
    usage = run_local_head()
    assert usage.returncode == 2 and "start|stop|status" in usage.stderr


def test_local_head_env_turns_token_auth_on():
    result = run_local_head("env", RAY_PORT="16379", DASHBOARD_PORT="18265")
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    assert exports["RAY_AUTH_MODE"] == "token"
    assert exports["RAY_ADDRESS"] == "127.0.0.1:16379"
    assert exports["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:18265"


def test_local_head_refuses_auth_off():
    result = run_local_head("start", RAY_AUTH_MODE="disabled")
    assert result.returncode != 0 and "token authentication" in result.stderr
