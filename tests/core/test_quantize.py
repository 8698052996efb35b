"""int8-/fp8-torchao (weight-only) train a LoRA on a CPU: gradients flow through the quantized base, held quantized."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

from flux_ray.core.checkpointing import apply_gradient_checkpointing
from flux_ray.core.compile import compile_blocks
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.quantize import WeightOnlyLinear, check_quantization_supported, quantize_base
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.spec import FlowSpec, LoraSpec, ModelSpec

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=2)
STORED = {"fp8-torchao": ("Float8Tensor", torch.float8_e4m3fn), "int8-torchao": ("Int8Tensor", torch.int8)}
PRECISIONS = pytest.mark.parametrize("precision", sorted(STORED))


def quantized_and_dequantized(precision: str):
    """The quantized base, and a bf16 copy whose weights are its dequantized weights (the same math, unquantized)."""
    pytest.importorskip("torchao")
    q = build_transformer_from_config(CONFIG, "cpu", torch.bfloat16, seed=0)
    ref = copy.deepcopy(q)
    quantize_base(q, ModelSpec(base_model_precision=precision), torch.device("cpu"))
    for name, m in q.named_modules():
        if isinstance(m, WeightOnlyLinear):
            ref.get_submodule(name).weight.data = m.weight.dequantize()
    return q, ref


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


@PRECISIONS
def test_lora_step_matches_the_dequantized_base(precision):
    q, ref = quantized_and_dequantized(precision)
    blocks = [*q.transformer_blocks, *q.single_transformer_blocks]
    quantized = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    kind, dtype = STORED[precision]
    assert quantized and all(isinstance(m, WeightOnlyLinear) and type(m.weight).__name__ == kind
                             and m.weight.qdata.dtype == dtype for m in quantized)
    assert type(q.proj_out) is torch.nn.Linear  # outside the blocks: kept in bf16, as nf4 does
    loss, grads = lora_step(q)
    ref_loss, ref_grads = lora_step(ref)
    assert torch.isfinite(loss) and all(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@PRECISIONS
def test_backward_holds_the_quantized_weight_not_a_bf16_copy(precision):
    q, _ = quantized_and_dequantized(precision)
    layer = q.single_transformer_blocks[0].proj_out
    saved = []
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [type(t).__name__ for t in saved] == [STORED[precision][0]]  # torchao's own linear saves a bf16 copy
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    expected = torch.ones(3, layer.out_features, dtype=torch.bfloat16) @ layer.weight.dequantize()
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(("precision", "checkpointed"), [("int8-quanto", False), ("int8-quanto", True),
                                                         ("int8-torchao", True), ("fp8-torchao", True)])
def test_compiled_quantized_blocks_give_the_eager_gradients(precision, checkpointed):
    """train.compile on a quantized base: each block compiles whole (fullgraph) and gives eager's gradients.
    The single blocks' aliasing outputs made AOT autograd refuse graphs with quantized (subclass) weights."""
    pytest.importorskip("torchao")
    q = build_transformer_from_config(dict(CONFIG, num_layers=1, num_single_layers=1), "cpu", torch.bfloat16, seed=0)
    quantize_base(q, ModelSpec(base_model_precision=precision), torch.device("cpu"))
    if checkpointed:
        apply_gradient_checkpointing(q, 1)
    g = torch.Generator().manual_seed(4)
    dim = q.single_transformer_blocks[0].proj_out.out_features
    image, text, temb = (torch.randn(*shape, dim, generator=g, dtype=torch.bfloat16) for shape in ((1, 12), (1, 5), (1,)))

    def input_grads():
        x = image.clone().requires_grad_(True)
        enc, hidden = q.transformer_blocks[0](x, text, temb)
        out = torch.cat(q.single_transformer_blocks[0](hidden, enc, temb), dim=1)
        return torch.autograd.grad(out.float().square().sum(), x)[0]

    eager = input_grads()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compile_blocks(q, backend="aot_eager")
    compiled = input_grads()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # one whole graph a block
    assert eager.abs().sum() > 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@PRECISIONS
def test_without_torchao_says_how_to_install(monkeypatch, precision):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(ValueError, match=rf"{precision}.*needs the torchao package \(pip install 'flux_ray\[torchao\]'\)"):
        check_quantization_supported(precision, torch.device("cpu"))
