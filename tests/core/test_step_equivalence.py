"""The fast step configuration computes the same loss and LoRA gradients as the plain one (CPU, tiny Flux).

Fast: every 2nd block checkpointed, the flash SDPA kernel, PEFT's LoRA input cast skipped under autocast,
optionally the blocks compiled. Plain: none of these, the math SDPA kernel. Both see the same weights,
batch and generator, so noise, sigmas and guidance are the same draws.
"""
from __future__ import annotations

import torch

from flux_ray.core.checkpointing import apply_gradient_checkpointing
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec

# two double and three single blocks, so interval 2 mixes checkpointed and plain blocks of each kind
CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=3)


def make_model(dtype: torch.dtype):
    model = build_transformer_from_config(CONFIG, "cpu", dtype, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so A gets gradients too
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, params


def make_batch(bs: int = 2) -> FluxBatch:
    g = torch.Generator().manual_seed(2)
    return FluxBatch(torch.randn(bs, 16, 8, 8, generator=g), torch.randn(bs, 7, 32, generator=g),
                     torch.randn(bs, 32, generator=g))


def loss_and_grads(dtype, *, ckpt: int, backend: str, uncast: bool, compile_blocks: str | None = None,
                   autocast: torch.dtype | None = None):
    model, params = make_model(dtype)
    if ckpt:
        apply_gradient_checkpointing(model, ckpt)
    if compile_blocks:
        from flux_ray.core.compile import compile_blocks as compile_

        compile_(model, backend=compile_blocks)
    fn = FluxLossFn(model, FlowSpec(flow_schedule_auto_shift=True), scheduler_config=dict(FLUX_SCHEDULER),
                    fast_schedule=False, autocast_dtype=autocast, attention_backend=backend)
    if not uncast:
        fn._uncast_lora = []
    loss = fn(make_batch(), torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def assert_close(a, b, rtol, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        assert ga.abs().sum() > 0
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


def test_checkpointing_and_flash_match_plain_step_fp32():
    plain = loss_and_grads(torch.float32, ckpt=0, backend="math", uncast=False)
    fast = loss_and_grads(torch.float32, ckpt=2, backend="flash", uncast=True)
    assert_close(plain, fast, rtol=1e-4, atol=1e-6)


def test_skipping_lora_input_cast_is_bit_identical_under_autocast():
    """bf16 base, fp32 LoRA, bf16 autocast: the trainer's mixed-precision setting."""
    plain = loss_and_grads(torch.bfloat16, ckpt=0, backend="math", uncast=False, autocast=torch.bfloat16)
    fast = loss_and_grads(torch.bfloat16, ckpt=0, backend="math", uncast=True, autocast=torch.bfloat16)
    assert_close(plain, fast, rtol=0, atol=0)
    ckpt = loss_and_grads(torch.bfloat16, ckpt=2, backend="math", uncast=True, autocast=torch.bfloat16)
    assert_close(plain, ckpt, rtol=0, atol=0)


def test_lora_input_cast_restored_after_step():
    """Outside the training forward (validation pipeline, no autocast) PEFT casts inputs again."""
    model, _ = make_model(torch.bfloat16)
    fn = FluxLossFn(model, FlowSpec(), scheduler_config={}, fast_schedule=False, autocast_dtype=torch.bfloat16,
                    attention_backend="auto")
    assert fn._uncast_lora
    fn(make_batch(), torch.Generator().manual_seed(3)).backward()
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in fn._uncast_lora)


def test_compiled_blocks_match_plain_step_fp32():
    """Regional compile as the trainer applies it (checkpointed and plain blocks of both kinds, PEFT's cast
    skipped), captured by dynamo + AOTAutograd. The aot_eager backend stops short of inductor's code generation:
    a cold inductor CPU compile of these graphs takes ~2 min on 2 cores; inductor's GPU kernels are what the
    trainer runs, and bench/train_step_bench.py runs them (compile=1) next to the eager step."""
    plain = loss_and_grads(torch.float32, ckpt=0, backend="math", uncast=False)
    fast = loss_and_grads(torch.float32, ckpt=2, backend="flash", uncast=True, compile_blocks="aot_eager")
    assert_close(plain, fast, rtol=1e-4, atol=1e-6)
