"""Group offload (core/offload.py): diffusers' hooks own the base, not the adapter, and training is unchanged.

The CPU tests offload to disk: between uses diffusers empties each group's tensors (``torch.empty_like``)
and reloads them from safetensors files, so a step that used a weight while it was offloaded, or an
adapter that went through the files (restored to its first value every forward), gives other numbers.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch
from safetensors import safe_open

from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.offload import apply_group_offload, keep_unowned_on_device
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=2)
GPU_CONFIG = dict(CONFIG, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                  axes_dims_rope=(16, 24, 24))  # weights >> LoRA and activations
STEPS = 3


def offload_spec(kind="block_level", per_group=1, disk=None, stream=False):
    return types.SimpleNamespace(group_offload_type=kind, group_offload_blocks_per_group=per_group,
                                 group_offload_use_stream=stream, group_offload_to_disk_path=disk)


def build(device="cpu", offload=None, ckpt=0, config=CONFIG):
    model = build_transformer_from_config(config, device, torch.float32, seed=0)
    if offload is not None:
        apply_group_offload(model, offload, device)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    if offload is not None:
        keep_unowned_on_device(model, device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so A gets gradients too
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if ckpt:
        from flux_ray.core.checkpointing import apply_gradient_checkpointing

        apply_gradient_checkpointing(model, ckpt)
    return model, params


def train(model, params, device="cpu"):
    """STEPS AdamW steps; returns (losses, first step's LoRA grads, final LoRA weights)."""
    fn = FluxLossFn(model, FlowSpec(flow_schedule_auto_shift=True), scheduler_config=dict(FLUX_SCHEDULER),
                    fast_schedule=False, attention_backend="math" if device == "cuda" else "auto")
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(2)
    batch = FluxBatch(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
                      torch.randn(2, 32, generator=g)).to(device)
    losses, grads = [], None
    for step in range(STEPS):
        loss = fn(batch, torch.Generator().manual_seed(3 + step))
        loss.backward()
        grads = grads or [p.grad.detach().clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), grads, [p.detach().clone() for p in params]


@functools.lru_cache(maxsize=1)
def plain_run():
    return train(*build())


def assert_same_training(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    for x, y in zip(a[1] + a[2], b[1] + b[2], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_hooks_own_the_base_and_not_the_adapter(tmp_path):
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    base = [*model.parameters(), *model.buffers()]
    groups = apply_group_offload(model, offload_spec(disk=str(tmp_path)), "cpu")
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    keep_unowned_on_device(model, "cpu")
    blocks = [model, *model.transformer_blocks, *model.single_transformer_blocks]
    assert all(b._diffusers_hook.get_hook("group_offloading") is not None for b in blocks)
    assert groups == len(blocks)  # one group a block, one for the rest of the model
    lora_modules = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    assert lora_modules and not any(hasattr(m, "_diffusers_hook") for m in lora_modules)
    owned = {id(t) for g in model._flux_ray_offload.groups for t in (*g.parameters, *g.buffers)}
    assert owned == {id(t) for t in base}  # pinned: moving a group never sweeps in the LoRA inside its blocks
    files = sorted(tmp_path.glob("group_*.safetensors"))
    assert len(files) == groups
    on_disk = 0
    for f in files:
        with safe_open(str(f), "pt") as sf:
            on_disk += sum(sf.get_tensor(k).numel() for k in sf.keys())
    assert on_disk == sum(t.numel() for t in base) and params  # the base, all of it, and no LoRA tensor


@pytest.mark.parametrize("kind, per_group, ckpt", [("block_level", 1, 0), ("block_level", 2, 1), ("leaf_level", 1, 0),
                                                    ("leaf_level", 1, 1)])
def test_offloaded_training_matches_plain(tmp_path, kind, per_group, ckpt):
    model, params = build(offload=offload_spec(kind, per_group, disk=str(tmp_path)), ckpt=ckpt)
    assert_same_training(train(model, params), plain_run())


def test_memory_offload_matches_plain():
    model, params = build(offload=offload_spec("block_level"), ckpt=1)
    assert_same_training(train(model, params), plain_run())


@pytest.mark.parametrize("lora", [{"flux_lora_target": "all", "lora_rank": 4},
                                  {"lora_type": "lycoris", "lycoris_config": {"algo": "lokr", "factor": 4}}])
def test_trainer_build_offloads_the_base_and_keeps_the_adapter(tiny_model_dir, lora):
    from flux_ray.spec import JobSpec
    from flux_ray.train.build import build_transformer

    spec = JobSpec.model_validate({"datasets": [{"id": "d", "instance_data_dir": "."}], "lora": lora,
                                   "model": {"pretrained_model_name_or_path": tiny_model_dir, "enable_group_offload": True},
                                   "train": {"gradient_checkpointing": True}})
    model, adapter, _ = build_transformer(spec, torch.device("cpu"))
    assert model._diffusers_hook.get_hook("group_offloading") is not None
    owned = {id(t) for g in model._flux_ray_offload.groups for t in g.parameters}
    assert adapter.params and not owned & {id(p) for p in adapter.params}


def test_refuses_an_adapter_already_attached_and_streams_on_cpu():
    model, _ = build()
    with pytest.raises(ValueError, match="attach the adapter after it"):
        apply_group_offload(model, offload_spec(), "cpu")
    fresh = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    with pytest.raises(ValueError, match="model.group_offload_use_stream needs a CUDA device"):
        apply_group_offload(fresh, offload_spec(stream=True), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind, stream", [("block_level", False), ("block_level", True), ("leaf_level", False),
                                          ("leaf_level", True)])
def test_cuda_offload_trains_like_plain_with_the_base_on_the_cpu(kind, stream):
    """CPU -> CUDA for real: same numbers as the plain step; the base is on the GPU a few groups at a time."""
    plain = train(*build("cuda", ckpt=1, config=GPU_CONFIG), device="cuda")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model, params = build("cuda", offload=offload_spec(kind, stream=stream), ckpt=1, config=GPU_CONFIG)
    base_bytes = sum(t.numel() * t.element_size() for g in model._flux_ray_offload.groups
                     for t in (*g.parameters, *g.buffers))
    assert torch.cuda.memory_allocated() - before < 0.1 * base_bytes  # the LoRA only
    torch.cuda.reset_peak_memory_stats()
    assert_same_training(train(model, params, device="cuda"), plain, atol=1e-5)
    assert torch.cuda.max_memory_allocated() - before < 0.75 * base_bytes  # a few of the 7 groups at once
    assert all(t.device.type == "cpu" for g in model._flux_ray_offload.groups for t in g.parameters)
