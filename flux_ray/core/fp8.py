"""FP8 compute for the frozen base (``model.base_compute_dtype: fp8``): e4m3 GEMMs with rowwise scales.

Each frozen Linear of the blocks (a PEFT LoRA's ``base_layer`` or a plain one) becomes an ``Fp8Linear``
whose weight is quantised once, at build time, into two e4m3 copies: W (out x in) scaled per output row
for the forward GEMM, and W^T (in x out) scaled per input column for the input-gradient GEMM. Together
they take the bytes of the bf16 weight they replace. Per step, each token's activation row (forward) and
gradient row (backward) is scaled by its amax and cast to e4m3 (torchao's rowwise recipe: e4m3 for the
gradient too, power-of-2 scales), and the GEMM is torch's ``_scaled_mm`` through
torchao's ``addmm_float8_unwrapped_inference``. Compiled (``train.compile``), dynamo traces this autograd
Function into the block's graph, so inductor fuses each amax / scale / cast into the neighbouring kernels.

Why not torchao's ``convert_to_float8_training`` (``Float8Linear``): it is built for trained weights. Each
forward and backward it re-quantises the weight (two passes over 12 B parameters a step, three with
checkpointing), it saves the bf16 input for a weight gradient, and its backward computes that weight
gradient (a third GEMM as large as the others) whether or not the weight wants one. A frozen base needs
the forward and the input gradient only; the LoRA's A/B stay in their own dtype beside it.

Linears that read one input run as one FP8 GEMM (core/fp8_fused.py, ``FUSE_PROJECTIONS``).

``emulate``: the same quantisation, the GEMMs dequantised to fp32 (CPU tests; torchao's ``emulate`` too).
"""
from __future__ import annotations

import torch
from torchao.float8.config import ScalingGranularity
from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated
from torchao.float8.inference import addmm_float8_unwrapped_inference

E4M3 = torch.float8_e4m3fn
KEY = "model.base_compute_dtype='fp8'"
GRAD_FAST_ACCUM = True
"""Fast (fp8-precision) accumulation in the input-gradient GEMM too, as in the forward. torchao's default is full
accumulation there; at full size the loss with fast accumulation tracked the bf16 base's within 0.03 % over 24
steps (bench/RESULTS.md call 31) and the step was faster (call 28). ``fp8_gacc=full`` in the bench turns it off."""
FUSE_PROJECTIONS = True
"""Linears sharing an input as one FP8 GEMM (core/fp8_fused.py); bench/train_step_bench.py's ``fp8_fuse=0``
turns it off."""


def check_fp8_supported(device: torch.device) -> None:
    """Fail early, with the option named, where there are no FP8 tensor cores (CPU; CUDA below sm_89)."""
    if device.type != "cuda":
        raise ValueError(f"{KEY} needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: "
                         f"L4/L40S/RTX 4090, H100/H200, B200); this worker runs on {device.type} "
                         "(use model.base_compute_dtype: bf16)")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(f"{KEY} needs FP8 tensor cores (compute capability 8.9+); "
                         f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]} "
                         "(use model.base_compute_dtype: bf16)")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor to e4m3 with its own scale: (x_e4m3, inverse scale (rows, 1), fp32).

    torchao's own scale and saturated cast (``tensor_to_scale``, ``to_fp8_saturated``): scale = 448 / amax,
    rounded down to a power of 2 as torchao's rowwise recipe does (scaling and unscaling are then exact)."""
    scale = tensor_to_scale(x, E4M3, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1,
                            round_scales_to_power_of_2=True)
    # contiguous: _scaled_mm wants a row-major first operand; an elementwise op keeps a strided input's layout
    return to_fp8_saturated(x.float() * scale, E4M3).contiguous(), scale.reciprocal()


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              bias: torch.Tensor | None, fast_accum: bool, emulate: bool) -> torch.Tensor:
    """bf16 (a * a_inv) @ (b * b_inv) (+ bias): a (M, K) row-major e4m3, b (K, N) column-major e4m3,
    a_inv (M, 1), b_inv (1, N)."""
    if emulate:
        out = (a.float() * a_inv) @ (b.float() * b_inv).contiguous()  # a strided fp32 b: 1000x slower on CPU
        return (out if bias is None else out + bias.float()).to(torch.bfloat16)
    return addmm_float8_unwrapped_inference(a, a_inv, b, b_inv, torch.bfloat16, bias=bias, use_fast_accum=fast_accum)


class _Fp8FrozenMatmul(torch.autograd.Function):
    """y = x W^T + b with x, dy in e4m3; no weight or bias gradient (the base is frozen). Saves no activation."""

    @staticmethod
    def forward(ctx, x, w, w_inv, wt, wt_inv, bias, emulate):
        ctx.save_for_backward(wt, wt_inv)
        ctx.emulate, ctx.x_dtype = emulate, x.dtype
        xq, x_inv = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = scaled_mm(xq, x_inv, w.t(), w_inv, bias, fast_accum=True, emulate=emulate)  # torchao's forward default
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        wt, wt_inv = ctx.saved_tensors
        gq, g_inv = quantize_rows(grad_out.reshape(-1, grad_out.shape[-1]))
        grad_x = scaled_mm(gq, g_inv, wt.t(), wt_inv, None, fast_accum=GRAD_FAST_ACCUM, emulate=ctx.emulate)
        return grad_x.reshape(*grad_out.shape[:-1], wt.shape[0]).to(ctx.x_dtype), None, None, None, None, None, None


class Fp8Linear(torch.nn.Module):
    """A frozen Linear computed in FP8: its weight held as two e4m3 copies (forward, input gradient).

    They are frozen Parameters rather than buffers (DDP broadcasts buffers every forward, a parameter once, at
    wrap, as it does the rest of the frozen base), holding the e4m3 bits as uint8: collectives have no fp8
    type (gloo: "Invalid scalar type" in DDP's first broadcast) and ``module.to(dtype)`` leaves integers alone."""

    def __init__(self, linear: torch.nn.Linear, emulate: bool = False):
        super().__init__()
        w = linear.weight.detach()
        (self.out_features, self.in_features), self.emulate = w.shape, emulate
        wq, w_inv = quantize_rows(w)
        wtq, wt_inv = quantize_rows(w.t())
        frozen = lambda t: torch.nn.Parameter(t.contiguous(), requires_grad=False)  # noqa: E731
        self.weight_fp8, self.weight_scale = frozen(wq.view(torch.uint8)), frozen(w_inv.reshape(1, -1))
        self.weight_t_fp8, self.weight_t_scale = frozen(wtq.view(torch.uint8)), frozen(wt_inv.reshape(1, -1))
        self.bias = None if linear.bias is None else frozen(linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        out = _Fp8FrozenMatmul.apply(x, self.weight_fp8.view(E4M3), self.weight_scale,
                                     self.weight_t_fp8.view(E4M3), self.weight_t_scale, self.bias, self.emulate)
        return out if out.dtype == dtype else out.to(dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The forward weight as the GEMM sees it, in fp32 (tests; merges)."""
        return self.weight_fp8.view(E4M3).float() * self.weight_scale.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise, emulate={self.emulate}"


def _fp8_eligible(name: str, module: torch.nn.Module) -> bool:
    """A frozen token-wise Linear: not a LoRA factor, not the AdaLN modulation (one row per sample, where
    FP8 saves nothing), and in / out multiples of 16 (``_scaled_mm``'s alignment)."""
    return (type(module) is torch.nn.Linear and not module.weight.requires_grad
            and ".lora_" not in f".{name}" and "norm" not in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_base_to_fp8(transformer: torch.nn.Module, device: torch.device, *, emulate: bool = False) -> int:
    """Swap the blocks' frozen Linears for ``Fp8Linear`` in place, after the adapter is attached (PEFT then
    holds each as ``base_layer``). ``emulate``: tests only, on a CPU; otherwise the device must have FP8
    tensor cores. Returns how many were converted."""
    if not emulate:
        check_fp8_supported(device)
    count = 0
    if FUSE_PROJECTIONS:
        from flux_ray.core.fp8_fused import fuse_projections

        count = fuse_projections(transformer, emulate=emulate)
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for blk in blocks:
            for name, mod in list(blk.named_modules()):
                if not _fp8_eligible(name, mod):
                    continue
                parent, _, attr = name.rpartition(".")
                setattr(blk.get_submodule(parent) if parent else blk, attr, Fp8Linear(mod, emulate=emulate))
                count += 1
    return count
