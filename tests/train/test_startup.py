"""Start-up levers (train/startup.py, train/build.py): the base loaded straight onto the GPU it trains on, and
inductor's compile workers started while it loads."""
from __future__ import annotations

import pytest
import torch

from flux_ray.spec import ModelSpec

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.fixture(scope="module")
def tiny_flux2_dir(tmp_path_factory) -> str:
    from flux_ray.core.flux2.tiny import write_tiny_flux2

    return str(write_tiny_flux2(tmp_path_factory.mktemp("flux2") / "klein-4b", "klein-4b"))


@pytest.mark.parametrize("family", ["flux", "flux2"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_base_loads_straight_onto_a_device_with_the_same_weights(request, family, device):
    """diffusers' device_map on one device (each family's loader): every weight on the device, frozen, equal to
    the CPU load, and no accelerate dispatch hooks left on the modules (DDP, PEFT and compile see a plain module)."""
    from flux_ray.families import get_family

    if family == "flux":
        spec = ModelSpec(pretrained_model_name_or_path=request.getfixturevalue("tiny_model_dir"))
    else:
        spec = ModelSpec(model_family="flux2", model_flavour="klein-4b",
                         pretrained_model_name_or_path=request.getfixturevalue("tiny_flux2_dir"))
    load = get_family(family).load_transformer
    plain = load(spec, torch.float32)
    direct = load(spec, torch.float32, device=torch.device(device))
    want = plain.state_dict()
    got = direct.state_dict()
    assert got.keys() == want.keys()
    assert all(t.device.type == device for t in got.values())
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
    assert not any(p.requires_grad for p in direct.parameters())
    assert not any(hasattr(m, "_hf_hook") for m in direct.modules())


def _spec(tmp_path, demo_data_dir, **model):
    from flux_ray.spec import load_spec

    return load_spec(data={"datasets": [{"id": "d", "instance_data_dir": str(demo_data_dir)}],
                           "output": {"uri": str(tmp_path)}, "model": model}, check_paths=False)


def test_only_a_base_trained_as_loaded_goes_straight_to_the_gpu(tmp_path, demo_data_dir):
    """Quantized bases are quantized on the CPU (quantize_via cpu) and offloaded ones stay there: both keep the
    CPU load; so does a CPU run."""
    from flux_ray.train.build import load_device

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    spec = _spec(tmp_path, demo_data_dir)
    assert load_device(spec, gpu) == gpu and load_device(spec, cpu) is None
    quantized = spec.model_copy(deep=True)
    quantized.model.base_model_precision = "int8-quanto"
    offloaded = spec.model_copy(deep=True)
    offloaded.model.enable_group_offload = True
    assert load_device(quantized, gpu) is None and load_device(offloaded, gpu) is None


def test_compile_workers_start_only_for_a_compiled_gpu_run(tmp_path, demo_data_dir):
    from flux_ray.train.startup import warm_compile_workers

    spec = _spec(tmp_path, demo_data_dir)
    assert warm_compile_workers(spec, torch.device("cuda", 0)) is None  # not compiled
    spec.train.compile = True
    assert warm_compile_workers(spec, torch.device("cpu")) is None  # inductor's pool serves Triton (GPU) kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compile_workers_are_up_before_the_first_compile(tmp_path, demo_data_dir):
    """On a GPU with Triton the pool exists (and was asked to start its workers) right after the call, before any
    graph was compiled; a later compile finds it instead of starting it."""
    from torch._inductor import async_compile

    from flux_ray.train.startup import warm_compile_workers

    spec = _spec(tmp_path, demo_data_dir)
    spec.train.compile = True
    assert warm_compile_workers(spec, torch.device("cuda", 0)) is not None
    assert async_compile._pool_set and async_compile.AsyncCompile._ready_future is not None
    async_compile.AsyncCompile.wait_pool_ready(timeout=120)
