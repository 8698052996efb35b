"""Quantized frozen bases: optimum-quanto int8/int4/int2, bitsandbytes NF4, torchao int8 / fp8 (weight-only)."""
from __future__ import annotations

import torch

QUANTO = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2"}
TORCHAO = ("int8-torchao", "fp8-torchao")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def check_quantization_supported(precision: str, device: torch.device) -> None:
    """Fail early, with the option named, when this device cannot run the quantized base."""
    if precision == "nf4-bnb" and device.type != "cuda":
        raise ValueError(f"model.base_model_precision={precision!r} needs a CUDA device; this worker runs on "
                         f"{device.type} (use no_change, a *-torchao or an *-quanto precision on CPU)")
    if precision in TORCHAO:  # weight-only: dequantize + a bf16 matmul, so any device (no int8/fp8 kernels)
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            raise ValueError(f"model.base_model_precision={precision!r} needs the torchao package "
                             "(pip install 'flux_ray[torchao]')") from e


def quantize_base(transformer: torch.nn.Module, model_spec, device: torch.device) -> torch.nn.Module:
    """Quantize the transformer's blocks in place (on the device when quantize_via=accelerator)."""
    precision = model_spec.base_model_precision
    if precision == "no_change":
        return transformer.to(device)
    check_quantization_supported(precision, device)
    where = device if model_spec.quantize_via == "accelerator" else torch.device("cpu")
    transformer.to(where)
    if precision in QUANTO:
        from optimum import quanto

        quanto.quantize(transformer, weights=getattr(quanto, QUANTO[precision]), exclude=outside_blocks(transformer))
        quanto.freeze(transformer)
        _cast_quanto_inputs(transformer)
    elif precision == "nf4-bnb":
        _to_nf4(transformer)
    else:
        _to_torchao_weight_only(transformer, precision)
    return transformer.to(device)


def outside_blocks(transformer: torch.nn.Module) -> list[str]:
    """quanto ``exclude`` patterns (fnmatch on module names) for every top-level part but the block lists: the
    embedders, output layers and FLUX.2's model-level AdaLN modulation stay in the base dtype, as torchao and
    nf4 leave them. For FLUX.1 this is the list once spelled out (proj_out, x_embedder, context_embedder,
    norm_out*, time_text_embed*; pos_embed holds no Linear)."""
    return [p for name, _ in transformer.named_children() if name not in BLOCK_LISTS for p in (name, f"{name}.*")]


def _cast_quanto_inputs(transformer: torch.nn.Module) -> None:
    """Feed each quantized Linear its weights' compute dtype, as autocast does for a plain nn.Linear.

    Autocast does not reach quanto's linear (a custom autograd function), so under bf16 autocast a
    LayerNorm's fp32 output arrived as is: the int8 kernel casts it itself, but int4's CUDA kernel
    (``torch._weight_int4pack_mm``, quanto's TinyGemm path) rejects it ("Expected A.dtype() == kBFloat16"),
    which is how stock quanto int4 Flux training crashes. Casting first changes no int8 result.
    """
    from optimum.quanto import QModuleMixin

    def cast_input(module, args):
        x = args[0] if args else None
        dtype = module.weight.dtype
        if torch.is_tensor(x) and x.is_floating_point() and x.dtype != dtype:
            return (x.to(dtype), *args[1:])
        return None

    for m in transformer.modules():
        if isinstance(m, QModuleMixin) and isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(cast_input)


def _to_nf4(transformer: torch.nn.Module) -> None:
    import bitsandbytes as bnb

    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for blk in blocks:
        for name, mod in list(blk.named_modules()):
            if not isinstance(mod, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device=mod.weight.device)
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4")
            if mod.bias is not None:
                q.bias = torch.nn.Parameter(mod.bias.data.clone(), requires_grad=False)
            parent = blk.get_submodule(name.rsplit(".", 1)[0]) if "." in name else blk
            setattr(parent, name.rsplit(".", 1)[-1], q.to(mod.weight.device))


def _to_torchao_weight_only(transformer: torch.nn.Module, precision: str) -> None:
    """The blocks' Linears to torchao int8 or fp8 weights (per-row scales), computed as dequantize + matmul.

    torchao's dynamic fp8 (fp8 activations and ``_scaled_mm``, SimpleTuner's fp8-torchao) has no backward
    (H100: "derivative for aten::_scaled_mm is not implemented"), and a LoRA below a frozen layer needs
    d(loss)/d(input) through it. Weight-only has one (the dequantized bf16 layer's), but torchao's linear
    saves the bf16 dequantized weight for it, a full bf16 copy of every layer held from forward to
    backward; ``WeightOnlyLinear`` saves the quantized weight and dequantizes again in backward.
    """
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = (Int8WeightOnlyConfig if precision == "int8-torchao" else Float8WeightOnlyConfig)(set_inductor_config=False)
    in_blocks = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith(  # noqa: E731
        ("transformer_blocks.", "single_transformer_blocks."))
    quantize_(transformer, config, filter_fn=in_blocks)
    for m in transformer.modules():
        if type(m) is torch.nn.Linear and type(m.weight).__name__ in ("Float8Tensor", "Int8Tensor"):
            m.__class__ = WeightOnlyLinear


class _WeightOnlyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return torch.nn.functional.linear(x, weight.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_out @ weight.dequantize(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_bias


class WeightOnlyLinear(torch.nn.Linear):
    """A Linear with a frozen torchao weight (Int8Tensor / Float8Tensor); backward holds it, not a bf16 copy.
    Compiled (``train.compile``), the dequantize is traced into the block's graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WeightOnlyLinear.apply(x, self.weight, self.bias)
