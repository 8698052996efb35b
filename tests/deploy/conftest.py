"""Fixtures for the deployment files: cluster/ (launcher YAML, Dockerfile, scripts) and k8s/.

Test modules take these as fixtures and never `import conftest` (ambiguous beside tests/conftest.py).
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
CLUSTER_DIR = REPO_ROOT / "cluster"


def load_yaml_docs(path: Path) -> list[dict]:
    """Every non-empty document of a (multi-document) YAML file."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=loader) if d is not None]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_pin() -> str:
    """The Ray version pyproject.toml pins (`ray[...]==X`): every other pin must equal it."""
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once as ray[...]==X.Y.Z; found {pins} in {deps}"
    return pins[0]


@pytest.fixture(scope="session")
def k8s_files() -> dict[str, list[dict]]:
    """k8s/<name>.yaml -> its documents, for every YAML file in k8s/ (kustomization.yaml included)."""
    files = {p.name: load_yaml_docs(p) for p in sorted(K8S_DIR.glob("*.y*ml"))}
    assert files, f"no YAML files in {K8S_DIR}"
    return files


@pytest.fixture(scope="session")
def k8s_objects(k8s_files) -> list[tuple[str, dict]]:
    """(file name, object) for every Kubernetes object in k8s/ (not the kustomization)."""
    return [(name, doc) for name, docs in k8s_files.items() if name != "kustomization.yaml" for doc in docs]


@pytest.fixture(scope="session")
def aws_cluster_config() -> dict:
    (config,) = load_yaml_docs(CLUSTER_DIR / "aws-gpu.yaml")
    return config
