"""fp8-torchao (weight-only) trains a LoRA on a CPU: gradients flow through the fp8 base, held in fp8."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.quantize import Fp8WeightOnlyLinear, check_quantization_supported, quantize_base
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec, ModelSpec

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=2)
FP8 = ModelSpec(base_model_precision="fp8-torchao")


def fp8_and_dequantized():
    """The fp8 base, and a bf16 copy whose weights are its dequantized weights (the same math, unquantized)."""
    pytest.importorskip("torchao")
    fp8 = build_transformer_from_config(CONFIG, "cpu", torch.bfloat16, seed=0)
    ref = copy.deepcopy(fp8)
    quantize_base(fp8, FP8, torch.device("cpu"))
    for name, m in fp8.named_modules():
        if isinstance(m, Fp8WeightOnlyLinear):
            ref.get_submodule(name).weight.data = m.weight.dequantize()
    return fp8, ref


def lora_step(model):
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, so gradients reach A and the layers below
        for p in params:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    fn = FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False,
                    autocast_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    batch = FluxBatch(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
                      torch.randn(2, 32, generator=g))
    loss = fn(batch, torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad for p in params]


def test_fp8_lora_step_matches_the_dequantized_base():
    fp8, ref = fp8_and_dequantized()
    blocks = [*fp8.transformer_blocks, *fp8.single_transformer_blocks]
    quantized = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert quantized and all(isinstance(m, Fp8WeightOnlyLinear) and m.weight.qdata.dtype == torch.float8_e4m3fn
                             for m in quantized)
    assert type(fp8.proj_out) is torch.nn.Linear  # outside the blocks: kept in bf16, as nf4 does
    loss, grads = lora_step(fp8)
    ref_loss, ref_grads = lora_step(ref)
    assert torch.isfinite(loss) and all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_fp8_backward_holds_the_fp8_weight_not_a_bf16_copy():
    fp8, _ = fp8_and_dequantized()
    layer = fp8.single_transformer_blocks[0].proj_out
    saved = []
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [type(t).__name__ for t in saved] == ["Float8Tensor"]  # torchao's own linear saves a bf16 copy
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    expected = torch.ones(3, layer.out_features, dtype=torch.bfloat16) @ layer.weight.dequantize()
    torch.testing.assert_close(grad, expected)


def test_fp8_without_torchao_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(ValueError, match=r"needs the torchao package \(pip install 'flux_ray\[fp8\]'\)"):
        check_quantization_supported("fp8-torchao", torch.device("cpu"))
