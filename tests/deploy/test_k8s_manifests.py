"""k8s/: the ray.io/v1 manifests against KubeRay's CRD schemas, and the wiring between the files.

The CRDs come from $FLUX_RAY_KUBERAY_CRDS (default ../shared/kuberay beside the checkout); without them these
tests skip with the reason, except under CI=true, where a missing CRD fails. Plain OpenAPI validation accepts unknown
fields, so the schemas are made strict first: a typo'd field fails here instead of being silently
dropped by the API server.
"""
from __future__ import annotations

import copy
import os
import shlex
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from flux_ray.spec import JobSpec, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
# KubeRay's published CRDs are data, not ours: CI provides them beside the checkout (../shared/kuberay).
KUBERAY_DIR = Path(os.environ.get("FLUX_RAY_KUBERAY_CRDS") or REPO_ROOT.parent / "shared" / "kuberay")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
RAY_API = "ray.io/v1"
EXAMPLE_SUFFIX = ".example.yaml"


# ---------------------------------------------------------------- schemas

def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema in which objects reject unknown fields.

    An object schema that lists `properties` and says nothing about the rest (no
    `additionalProperties`, no `x-kubernetes-preserve-unknown-fields`) gets `additionalProperties:
    false`; `nullable: true` becomes a JSON-schema "null" type so the two dialects agree.
    """
    out = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for key in ("properties", "patternProperties"):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("anyOf", "allOf", "oneOf"):
            walk(node.get(key, []))

    walk(out)
    return out


@cache
def crd_schema(kind: str) -> dict:
    """The openAPIV3Schema of the v1 version of KubeRay's CRD for `kind`."""
    path = KUBERAY_DIR / CRD_FILES[kind]
    if not path.is_file():
        why = (f"KubeRay CRD {path} is missing: the k8s/ manifests are validated against the CRDs in "
               f"$FLUX_RAY_KUBERAY_CRDS (default ../shared/kuberay beside the checkout; CI provides them). Put "
               f"ray-project/kuberay's ray-operator/config/crd/bases/{CRD_FILES[kind]} there.")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, f"{path} is the CRD of {crd['spec']['names']['kind']}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert "v1" in versions, f"{path} has no v1 version (has {sorted(versions)})"
    return versions["v1"]["schema"]["openAPIV3Schema"]


@cache
def strict_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(crd_schema(kind)))


def schema_errors(obj: dict, validator: jsonschema.Draft7Validator) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------- helpers over the manifests

def ray_objects(k8s_objects, kind: str | None = None) -> list[tuple[str, dict]]:
    return [(f, o) for f, o in k8s_objects
            if o.get("apiVersion") == RAY_API and (kind is None or o.get("kind") == kind)]


def cluster_specs(k8s_objects) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for each RayCluster and each RayJob's rayClusterSpec."""
    out = [(f"{f} RayCluster/{o['metadata']['name']}", o["spec"]) for f, o in ray_objects(k8s_objects, "RayCluster")]
    out += [(f"{f} RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"])
            for f, o in ray_objects(k8s_objects, "RayJob") if "rayClusterSpec" in o["spec"]]
    return out


def ray_containers(cluster_spec: dict) -> list[dict]:
    """The Ray container (index 0, as KubeRay requires) of the head and of every worker group."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def config_maps(k8s_objects) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for _, o in k8s_objects if o.get("kind") == "ConfigMap"}


def mounted_spec(rayjob: dict, k8s_objects) -> tuple[str, str, str]:
    """(subcommand, ConfigMap name, key) for a RayJob whose entrypoint is `flux-ray <cmd> <spec path>`."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:1] == ["flux-ray"] and len(argv) >= 3, f"entrypoint {argv} is not `flux-ray <cmd> <spec>`"
    cmd, spec_path = argv[1], argv[2]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m for m in head["containers"][0].get("volumeMounts", [])
              if spec_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1, f"{spec_path} is not under exactly one volumeMount of the head's Ray container"
    mount = mounts[0]
    rel = spec_path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = {v["name"]: v for v in head.get("volumes", [])}[mount["name"]]
    assert "configMap" in volume, f"volume {mount['name']} holding {spec_path} is not a ConfigMap"
    cm_name = volume["configMap"]["name"]
    key_for_path = {item["path"]: item["key"] for item in volume["configMap"].get("items", [])}
    key = key_for_path.get(rel, rel) if key_for_path else rel
    assert key in config_maps(k8s_objects).get(cm_name, {}).get("data", {}), \
        f"{spec_path} -> key {key!r} of ConfigMap {cm_name!r}, which k8s/ does not define"
    return cmd, cm_name, key


def job_spec_of(rayjob: dict, k8s_objects) -> tuple[str, JobSpec]:
    cmd, cm_name, key = mounted_spec(rayjob, k8s_objects)
    text = config_maps(k8s_objects)[cm_name]["data"][key]
    return cmd, load_spec(data=yaml.safe_load(text), check_paths=False)


# ---------------------------------------------------------------- CRD schema

def test_ray_manifests_exist(k8s_objects):
    kinds = sorted(o["kind"] for _, o in ray_objects(k8s_objects))
    assert kinds == ["RayCluster", "RayJob", "RayJob"], kinds


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_crds_skip_with_the_reason_or_fail_under_ci(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setattr(sys.modules[__name__], "KUBERAY_DIR", tmp_path / "kuberay", raising=True)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="FLUX_RAY_KUBERAY_CRDS"):
        crd_schema.__wrapped__("RayJob")


def test_crd_location_comes_from_the_environment(tmp_path):
    """A checkout elsewhere points FLUX_RAY_KUBERAY_CRDS at its CRDs (read when the module loads)."""
    import subprocess

    code = "import tests.deploy.test_k8s_manifests as m; print(m.KUBERAY_DIR)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, FLUX_RAY_KUBERAY_CRDS=str(tmp_path), PYTHONPATH=str(REPO_ROOT)))
    assert out.stdout.strip() == str(tmp_path)


def test_ray_manifests_match_crd_schema(k8s_objects):
    problems = []
    for name, obj in ray_objects(k8s_objects):
        assert obj["kind"] in CRD_FILES, f"{name}: no KubeRay CRD for kind {obj['kind']}"
        problems += [f"{name} {obj['kind']}/{obj['metadata']['name']}: {e}"
                     for e in schema_errors(obj, strict_validator(obj["kind"]))]
    assert not problems, "manifests that do not match the KubeRay CRDs:\n" + "\n".join(problems)


@pytest.mark.parametrize("kind, path, typo", [
    ("RayCluster", ["spec"], "enableInTreeAutoscalling"),
    ("RayCluster", ["spec", "workerGroupSpecs", 0], "maxReplica"),
    ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "containers", 0], "envfrom"),
    ("RayJob", ["spec"], "ttlSecondsAfterFinish"),
    ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"],
     "limit"),
])
def test_strict_schema_rejects_typos(k8s_objects, kind, path, typo):
    obj = copy.deepcopy(ray_objects(k8s_objects, kind)[0][1])
    node = obj
    for part in path:
        node = node[part]
    node[typo] = node.get(typo[:-1], 1)
    plain = jsonschema.Draft7Validator(crd_schema(kind))
    assert not schema_errors(obj, plain), "the plain CRD schema should let unknown fields through"
    errors = schema_errors(obj, strict_validator(kind))
    assert any(repr(typo) in e for e in errors), f"typo {typo!r} not reported; errors: {errors}"


def test_strict_schema_still_rejects_wrong_types(k8s_objects):
    obj = copy.deepcopy(ray_objects(k8s_objects, "RayJob")[0][1])
    obj["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in e for e in schema_errors(obj, strict_validator("RayJob")))


# ---------------------------------------------------------------- kustomization

def test_kustomization_lists_every_manifest(k8s_files):
    (kustomization,) = k8s_files["kustomization.yaml"]
    listed = kustomization.get("resources", [])
    assert len(listed) == len(set(listed)), f"duplicates in kustomization resources: {listed}"
    examples = {n for n in k8s_files if n.endswith(EXAMPLE_SUFFIX)}
    expected = set(k8s_files) - {"kustomization.yaml"} - examples
    assert set(listed) == expected, (f"kustomization.yaml resources {sorted(listed)} != manifests in k8s/ "
                                     f"{sorted(expected)} (missing: {sorted(expected - set(listed))}, "
                                     f"unknown: {sorted(set(listed) - expected)})")
    assert not examples & set(listed), f"example Secrets must not be applied: {sorted(examples & set(listed))}"


def test_example_secrets_hold_placeholders(k8s_objects):
    secrets = [(f, o) for f, o in k8s_objects if o.get("kind") == "Secret"]
    assert secrets, "k8s/ should document the Secrets the pods read with *.example.yaml files"
    for name, secret in secrets:
        assert name.endswith(EXAMPLE_SUFFIX), f"{name}: a Secret with values belongs in an *{EXAMPLE_SUFFIX} file"
        assert "data" not in secret, f"{name}: use stringData so the placeholders stay readable"
        for key, value in secret["stringData"].items():
            if "REGION" not in key:
                assert "EXAMPLE" in value and "REPLACE" in value.upper(), f"{name}: {key} looks like a real value"


# ---------------------------------------------------------------- RayJobs and their specs

def test_rayjobs_clean_up_after_themselves(k8s_objects):
    for name, job in ray_objects(k8s_objects, "RayJob"):
        spec = job["spec"]
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec, f"{name}: must bring its own cluster"
        assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: shutdownAfterJobFinishes must be true"
        assert spec.get("ttlSecondsAfterFinished", 0) > 0, f"{name}: set ttlSecondsAfterFinished (> 0)"


def test_rayjob_entrypoints_name_a_mounted_valid_spec(k8s_objects):
    commands = {}
    for name, job in ray_objects(k8s_objects, "RayJob"):
        cmd, spec = job_spec_of(job, k8s_objects)
        commands[job["metadata"]["name"]] = cmd
        assert cmd in ("run", "tune"), f"{name}: unknown flux-ray subcommand {cmd!r}"
        if cmd == "tune":
            assert spec.tune is not None and spec.tune.param_space, f"{name}: `flux-ray tune` needs a tune: section"
        else:
            assert spec.tune is None, f"{name}: `flux-ray run` would ignore the spec's tune: section"
    assert sorted(commands.values()) == ["run", "tune"], commands


def test_job_specs_only_use_object_storage(k8s_objects):
    """Pods share no disk: datasets, cache and output must be on S3; AWS needs no endpoint."""
    for name, job in ray_objects(k8s_objects, "RayJob"):
        _, spec = job_spec_of(job, k8s_objects)
        assert spec.cache.uri.startswith("s3://"), f"{name}: cache.uri {spec.cache.uri}"
        assert spec.output.uri.startswith("s3://"), f"{name}: output.uri {spec.output.uri}"
        assert all(d.type == "s3" for d in spec.datasets), f"{name}: every dataset must be type s3"
        assert spec.storage.aws_endpoint_url is None, f"{name}: AWS S3 takes no storage.aws_endpoint_url"
        assert spec.scaling.use_gpu, f"{name}: scaling.use_gpu must be true on the GPU worker group"


def test_sweep_search_space_yields_valid_specs(k8s_objects):
    """Every corner of each tune dimension, written into the spec, still validates."""
    for name, job in ray_objects(k8s_objects, "RayJob"):
        cmd, spec = job_spec_of(job, k8s_objects)
        if cmd != "tune":
            continue
        base = spec.model_dump(mode="json", exclude={"tune"})
        for key, dim in spec.tune.param_space.items():
            samples = dim.values if dim.type in ("choice", "grid") else [dim.lower, dim.upper]
            if dim.type == "randint":
                samples = [int(dim.lower), int(dim.upper) - 1]
            for value in samples:
                node = load_spec(data=base, overrides=[f"{key}={value}"], check_paths=False)
                for part in key.split("."):
                    node = getattr(node, part)
                assert node == pytest.approx(value), f"{name}: {key}={value} did not land in the spec"


def test_worker_groups_fit_the_jobs(k8s_objects):
    """The autoscaler can reach enough GPUs: else the job waits for resources forever."""
    for name, job in ray_objects(k8s_objects, "RayJob"):
        cmd, spec = job_spec_of(job, k8s_objects)
        gpus_per_worker = (spec.scaling.resources_per_worker or {}).get("GPU", 1)
        concurrent = 1
        if cmd == "tune":
            concurrent = spec.tune.max_concurrent_trials or spec.tune.num_samples
        needed = spec.scaling.num_workers * gpus_per_worker * concurrent
        reachable = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                        * g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
        assert reachable >= needed, f"{name}: needs {needed} GPUs at once, worker groups reach {reachable}"


# ---------------------------------------------------------------- one image, one Ray, token auth

def test_clusters_agree_with_the_pins(k8s_objects, k8s_files, aws_cluster_config, ray_pin):
    (kustomization,) = k8s_files["kustomization.yaml"]
    (image_entry,) = kustomization["images"]
    image = aws_cluster_config["docker"]["image"]
    assert image == f"{image_entry['name']}:{image_entry['newTag']}", \
        f"cluster/aws-gpu.yaml runs {image}; kustomization.yaml sets {image_entry}"
    specs = cluster_specs(k8s_objects)
    assert len(specs) == 3, [w for w, _ in specs]
    for where, spec in specs:
        assert spec["rayVersion"] == ray_pin, f"{where}: rayVersion {spec['rayVersion']} != pyproject's {ray_pin}"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: set authOptions.mode: token"
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
        for container in ray_containers(spec):
            assert container["image"] == image, f"{where}: {container['name']} runs {container['image']} != {image}"


def test_worker_groups_are_gpu_autoscaling_groups(k8s_objects):
    for where, spec in cluster_specs(k8s_objects):
        head = ray_containers(spec)[0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), f"{where}: the head is CPU-only"
        assert spec.get("workerGroupSpecs"), f"{where}: no worker group"
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where} {group['groupName']}: no nvidia.com/gpu limit"
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], \
                f"{where} {group['groupName']}: need minReplicas <= replicas <= maxReplicas"


def test_s3_credentials_come_from_the_documented_secret(k8s_objects):
    """Every Ray container loads the Secret that secret-s3.example.yaml documents, with the AWS_* keys."""
    documented = {o["metadata"]["name"]: set(o["stringData"]) for _, o in k8s_objects if o.get("kind") == "Secret"}
    for where, spec in cluster_specs(k8s_objects):
        for container in ray_containers(spec):
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})]
            assert refs, f"{where} {container['name']}: no credentials from a Secret"
            for ref in refs:
                assert ref in documented, f"{where} {container['name']}: Secret {ref!r} has no *.example.yaml"
            assert any({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= documented[r] for r in refs), \
                f"{where} {container['name']}: no Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"


def test_manifest_dir_has_only_yaml():
    stray = [p.name for p in K8S_DIR.iterdir() if p.is_file() and p.suffix not in (".yaml", ".md")]
    assert not stray, f"unexpected files in k8s/: {stray}"
