"""The models the step benches time (train_step_bench.py, stock_flux2_klein_step.py): config, blocks, FLOPs.

A variant names ``family`` (flux: FLUX.1-dev | flux2: FLUX.2, with ``flavour`` klein-4b | klein-9b | dev) and
``model`` (dev: the full-size transformer of that family and flavour | tiny: the tiny one of CPU tests).

Model FLOPs of one LoRA step, as the FLUX.1 stock script counts them (and MFU against 800 TFLOP/s as there):
forward plus the input-gradient backward of the frozen base (no weight gradients, no recompute, LoRA and
per-sample modulation left out): linear 2 * P * S forward and again backward, attention 4 * S^2 * D per block
forward and twice that backward, with S = image + text tokens and D = heads * head_dim.
P is the blocks' per-token linear parameters. FLUX.1-dev: 6.45e9 (12 D^2 a block, 57 blocks; kept as the stock
script has it). FLUX.2 (``Flux2Transformer2DModel``): a double block holds 26 D^2 in Linears, 13 D^2 a stream
(to_q/k/v 3 D^2, to_out 1, SwiGLU ff.linear_in D -> 2 x 3D: 6, ff.linear_out 3D -> D: 3) and each token passes
through one stream; a single block holds 13 D^2 (to_qkv_mlp_proj D -> 3D + 6D: 9, to_out 4D -> D: 4). So
P = 13 D^2 (num_layers + num_single_layers); :func:`flux2_block_linear_params` counts it on the meta device.
"""
from __future__ import annotations

PEAK_FLOPS = 800e12
FLUX1_PER_TOKEN_LINEAR = 6.45e9
FAMILIES = ("flux", "flux2")
FLUX2_FLAVOURS = ("klein-4b", "klein-9b", "dev")


def transformer_config(family: str, flavour: str, model: str) -> dict:
    """The transformer's constructor kwargs (``FluxTransformer2DModel`` / ``Flux2Transformer2DModel``)."""
    if model not in ("dev", "tiny"):
        raise ValueError(f"model={model!r}: expected dev (full size) or tiny")
    if family == "flux":
        from flux_ray.core.model import FLUX_DEV_TRANSFORMER
        from flux_ray.core.tiny import TINY_TRANSFORMER

        return dict(FLUX_DEV_TRANSFORMER if model == "dev" else TINY_TRANSFORMER)
    if family == "flux2":
        from flux_ray.core.flux2.flavours import get_flavour
        from flux_ray.core.flux2.tiny import TINY_TRANSFORMER as FLUX2_TINY

        fl = get_flavour(flavour)
        return dict(fl.transformer) if model == "dev" else {**FLUX2_TINY, "guidance_embeds": fl.guidance_embeds}
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def scheduler_config(family: str) -> dict:
    if family == "flux2":
        from flux_ray.core.flux2.flavours import FLUX2_SCHEDULER

        return dict(FLUX2_SCHEDULER)
    from flux_ray.core.tiny import FLUX_SCHEDULER

    return dict(FLUX_SCHEDULER)


def num_blocks(config: dict) -> int:
    return config["num_layers"] + config["num_single_layers"]


def width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def latent_hw(family: str, res: int) -> int:
    """Side of the cached latent the loss takes: FLUX.1 (16, H/8, W/8); FLUX.2 patchified (128, H/16, W/16)."""
    return res // 16 if family == "flux2" else res // 8


def per_token_linear(family: str, config: dict) -> float:
    return FLUX1_PER_TOKEN_LINEAR if family == "flux" else 13 * width(config) ** 2 * num_blocks(config)


def model_flops(family: str, config: dict, img_tokens: int, txt_tokens: int, bs: int) -> float:
    """Model FLOPs of one step (see the module docstring); FLUX.1 keeps the dev numbers for the tiny model too."""
    dims = transformer_config("flux", "", "dev") if family == "flux" else config
    s = img_tokens + txt_tokens
    lin_fwd = 2 * per_token_linear(family, dims) * s
    attn_fwd = num_blocks(dims) * 4 * s * s * width(dims)
    return bs * (lin_fwd + attn_fwd + lin_fwd + 2 * attn_fwd)


def flux2_block_linear_params(flavour: str) -> int:
    """Per-token Linear parameters of a full-size FLUX.2 transformer's blocks, counted on the meta device (one
    stream of each double block): what :func:`per_token_linear` computes from the config."""
    import torch

    from flux_ray.core.flux2.full_size import build_component

    model = build_component(flavour, "transformer", "meta")
    count = lambda blk: sum(m.weight.numel() for m in blk.modules() if isinstance(m, torch.nn.Linear))  # noqa: E731
    return sum(count(b) // 2 for b in model.transformer_blocks) + sum(count(b) for b in model.single_transformer_blocks)


def timed_steps(step, n: int, cuda: bool) -> list[float]:
    """Seconds per call of ``step`` for ``n`` calls: CUDA events around each on a GPU, wall time on a CPU."""
    import time

    import torch

    times = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times
