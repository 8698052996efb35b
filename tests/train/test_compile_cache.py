"""Compile artifacts shared through the run's storage (train/compile_cache.py): each case is a fresh process
with an empty local inductor cache, as a new node or trial is, so only the shared artifacts can make it warm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

STEP = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from flux_ray.core.compile import compile_blocks
    from flux_ray.core.lora import add_lora
    from flux_ray.core.model import build_transformer_from_config
    from flux_ray.core.step import FluxBatch, FluxLossFn
    from flux_ray.core.tiny import TINY_TRANSFORMER
    from flux_ray.spec import load_spec
    from flux_ray.train.compile_cache import CompileArtifacts

    cache_uri, backend, sides = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
    spec = load_spec(data={"datasets": [{"id": "d", "type": "s3", "aws_bucket_name": "b"}],
                           "cache": {"uri": cache_uri},
                           "train": {"compile": True, "attention_backend": backend}}, check_paths=False)
    config = dict(TINY_TRANSFORMER, num_layers=1, num_single_layers=1)
    model = build_transformer_from_config(config, "cpu", torch.float32, seed=0)
    add_lora(model, spec.lora)
    artifacts = CompileArtifacts(spec, config, torch.device("cpu"), rank=0)
    loaded = artifacts.load()
    compile_blocks(model)
    steps = []
    for side in sides:  # one step per latent size; counters after each
        g = torch.Generator().manual_seed(2)
        batch = FluxBatch(torch.randn(1, 16, side, side, generator=g), torch.randn(1, 7, 32, generator=g),
                          torch.randn(1, 32, generator=g))
        loss = FluxLossFn(model, spec.flow, scheduler_config={}, fast_schedule=False,
                          attention_backend=backend)(batch, torch.Generator().manual_seed(3))
        loss.backward()
        artifacts.after_step(len(steps) + 1)
        steps.append({"loss": loss.item(), "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]})
    print(json.dumps({"loaded": loaded, "uri": artifacts.uri, "steps": steps}))
""")


def fresh_process_steps(tmp_path, name: str, cache_uri: str, sides=(8,), backend: str = "math") -> dict:
    """Compiled steps (one per latent side) in a new process whose local inductor and Triton caches start empty."""
    local = tmp_path / f"local-{name}"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(local / "inductor"), TRITON_CACHE_DIR=str(local / "triton"),
               TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE="0")
    out = subprocess.run([sys.executable, "-c", STEP, cache_uri, backend, *map(str, sides)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A cold run: compiles everything, publishes the artifacts into the shared cache folder."""
    tmp = tmp_path_factory.mktemp("compile_cache")
    shared = str(tmp / "shared")
    return tmp, shared, fresh_process_steps(tmp, "cold", shared)


def test_a_cold_run_compiles_and_publishes(first):
    _, _, cold = first
    (step,) = cold["steps"]
    assert not cold["loaded"] and step["misses"] > 0 and step["hits"] == 0
    assert [os.path.getsize(p) > 0 for p in _blobs(cold["uri"])] == [True]


def _blobs(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".bin"))


def test_a_fresh_process_loads_the_artifacts_and_a_new_shape_still_compiles(first):
    tmp, shared, cold = first
    warm = fresh_process_steps(tmp, "warm", shared, sides=(8, 12))
    same, other = warm["steps"]
    assert warm["loaded"] and warm["uri"] == cold["uri"]
    assert same["hits"] >= cold["steps"][0]["misses"] and same["misses"] == 0  # nothing compiled for 8x8
    assert same["loss"] == pytest.approx(cold["steps"][0]["loss"], rel=1e-5)
    assert other["misses"] > 0  # the artifacts hold the 8x8 graphs only: 12x12 compiles its own
    assert len(_blobs(cold["uri"])) == 2  # ... and is published beside the cold run's blob, never over it


def test_a_run_that_sees_other_shapes_adds_to_the_artifacts_without_dropping_any(tmp_path):
    """Trial A sees 8x8, trial B (fresh, loads A's) sees 12x12 only and publishes what it compiled and hit (not
    the 8x8 graphs it never used); then a fresh process needing 8x8 compiles nothing and publishes nothing: B's
    blob was added beside A's, not over it."""
    shared = str(tmp_path / "shared")
    a = fresh_process_steps(tmp_path, "a", shared, sides=(8,))
    b = fresh_process_steps(tmp_path, "b", shared, sides=(12,))
    assert b["loaded"] and b["steps"][0]["misses"] > 0 and len(_blobs(a["uri"])) == 2
    again = fresh_process_steps(tmp_path, "again", shared, sides=(8,))
    assert again["loaded"] and again["steps"][0]["misses"] == 0 and len(_blobs(a["uri"])) == 2


def _spec(**train):
    from flux_ray.spec import load_spec

    return load_spec(data={"datasets": [{"id": "d", "type": "s3", "aws_bucket_name": "b"}],
                           "train": {"compile": True, **train}, "scaling": {"use_gpu": True}}, check_paths=False)


def test_options_that_change_the_graphs_change_the_key():
    import torch

    from flux_ray.train.compile_cache import artifact_key

    def key(**train):
        return artifact_key(_spec(**train), {"num_layers": 1}, torch.device("cpu"))

    assert key() == key(learning_rate=3e-4, max_train_steps=7)  # the graphs do not see these
    assert len({key(), key(attention_backend="flash"), key(gradient_checkpointing=True), key(train_batch_size=2),
                key(dynamo_mode="reduce-overhead")}) == 5


def test_a_broken_artifact_file_means_compiling_as_usual(tmp_path):
    """load() reports False (the caller then compiles) instead of raising; nothing is published over it."""
    import torch

    from flux_ray.train.compile_cache import CompileArtifacts

    spec = _spec()
    spec.cache.uri = str(tmp_path)
    artifacts = CompileArtifacts(spec, {"num_layers": 1}, torch.device("cpu"), rank=0)
    os.makedirs(artifacts.uri)
    with open(os.path.join(artifacts.uri, "0123.bin"), "wb") as f:
        f.write(b"not a torch cache artifact")
    assert artifacts.load() is False
