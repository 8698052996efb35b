"""The memory and speed levers on a tiny FLUX.2 (2 double + 2 single blocks, CPU): quantised bases (quanto),
FP8 compute (emulated), TREAD routing and group offload act on FLUX.2's blocks and leave the model-level
modulation alone."""
from __future__ import annotations

import functools
import types

import pytest
import torch

from flux_ray.core.checkpointing import apply_gradient_checkpointing, transformer_blocks
from flux_ray.core.flux2.flavours import FLUX2_SCHEDULER
from flux_ray.core.flux2.tiny import TINY_TRANSFORMER
from flux_ray.core.lora import add_lora
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tread import TokenRouter, resolve_routes
from flux_ray.families import get_family
from flux_ray.spec import FLUX2_LORA_TARGET_PRESETS, FlowSpec, LoraSpec, ModelSpec, TreadConfig, TreadRoute

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=2)
CPU = torch.device("cpu")
FLUX2 = get_family("flux2")
TXT, H, W = 7, 4, 4  # 7 text tokens; normalised latents 32 x 4 x 4 -> 16 image tokens
OUTSIDE = ("x_embedder", "context_embedder", "time_guidance_embed", "double_stream_modulation_img",
           "double_stream_modulation_txt", "single_stream_modulation", "norm_out", "proj_out")
"""FLUX.2's top-level parts with Linears: embedders, the shared AdaLN modulation, the output layers."""


def build(dtype=torch.bfloat16, guidance: bool = False, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Flux2Transformer2DModel(**CONFIG, guidance_embeds=guidance).requires_grad_(False)
    finally:
        torch.set_default_dtype(prev)


def lora(model, b_init: float = 0.0) -> list[torch.nn.Parameter]:
    params = add_lora(model, LoraSpec(lora_rank=4, peft_lora_target_modules=FLUX2_LORA_TARGET_PRESETS["all"]))
    if b_init:  # non-zero B, so gradients reach A and the layers below
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(b_init * torch.randn(p.shape, generator=g))
    return params


def loss_fn(model, tread=None, autocast=torch.bfloat16) -> FluxLossFn:
    return FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX2_SCHEDULER), fast_schedule=False,
                      autocast_dtype=autocast, tread=tread, family=FLUX2)


def batches(n: int, bs: int = 2, seed: int = 2) -> list[FluxBatch]:
    g = torch.Generator().manual_seed(seed)
    return [FluxBatch(torch.randn(bs, 32, H, W, generator=g), torch.randn(bs, TXT, 48, generator=g), None)
            for _ in range(n)]


def loss_and_grads(fn, params):
    loss = fn(batches(1)[0], torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def block_linears(model) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith(("transformer_blocks.", "single_transformer_"))
            and "lora_" not in n]


# ---------------------------------------------------------------- quantised base (optimum-quanto)

@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "int2-quanto"])
def test_quanto_quantises_the_blocks_and_keeps_the_modulation(precision):
    from optimum.quanto import QModuleMixin

    from flux_ray.core.quantize import quantize_base

    model = quantize_base(build(), ModelSpec(model_family="flux2", model_flavour="klein-4b",
                                             base_model_precision=precision), CPU)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QModuleMixin)}
    in_blocks = {n for n, m in block_linears(model) if isinstance(m, torch.nn.Linear)}
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in quantized  # the fused QKV + MLP-in Linear
    assert quantized == in_blocks  # every block Linear, nothing outside the blocks
    for part in OUTSIDE:  # embedders, output and the model-level modulation stay bf16
        assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16
                   for m in model.get_submodule(part).modules() if isinstance(m, torch.nn.Linear)), part
    params = lora(model, b_init=0.1)
    loss, grads = loss_and_grads(loss_fn(model), params)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- FP8 compute (emulated)

def fp8_model(fp8: bool, b_init: float = 0.0, guidance: bool = False):
    from flux_ray.core.fp8 import convert_base_to_fp8

    model = build(guidance=guidance)
    params = lora(model, b_init)
    if fp8:
        assert convert_base_to_fp8(model, CPU, emulate=True) > 0
    return model, params


def test_fp8_converts_the_block_linears_not_the_modulation_and_keeps_the_alignment_rule():
    from flux_ray.core.fp8 import Fp8Linear, _fp8_eligible

    model, _ = fp8_model(fp8=True, guidance=True)
    single = model.single_transformer_blocks[0].attn
    assert isinstance(single.to_qkv_mlp_proj.base_layer, Fp8Linear) and isinstance(single.to_out.base_layer, Fp8Linear)
    assert isinstance(model.transformer_blocks[0].ff.linear_in.base_layer, Fp8Linear)
    frozen = [m for _, m in block_linears(model) if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert not frozen  # every frozen block Linear is FP8 (the tiny widths are multiples of 16)
    for part in OUTSIDE:  # the shared AdaLN modulation (one row a sample) and the embedders stay bf16
        assert not any(isinstance(m, Fp8Linear) for m in model.get_submodule(part).modules()), part
    assert type(model.double_stream_modulation_img.linear) is torch.nn.Linear
    odd = torch.nn.Linear(40, 288).requires_grad_(False)  # in_features not a multiple of 16: _scaled_mm refuses it
    assert not _fp8_eligible("attn.to_qkv_mlp_proj", odd)
    assert _fp8_eligible("attn.to_qkv_mlp_proj", torch.nn.Linear(48, 288).requires_grad_(False))


def train_eval_loss(fp8: bool, steps: int = 20) -> tuple[float, float]:
    """(eval loss before, after) ``steps`` AdamW steps of the LoRA on two fixed batches (the trainer's eval)."""
    torch.manual_seed(0)
    model, params = fp8_model(fp8)
    fn, opt, data = loss_fn(model), torch.optim.AdamW(params, lr=3e-2), batches(2)

    def evaluate() -> float:
        return float(torch.cat([fn.eval_loss(b, [10 * i, 10 * i + 1], 3) for i, b in enumerate(data)]).mean())

    start = evaluate()
    for step in range(steps):
        fn(data[step % len(data)], torch.Generator().manual_seed(100 + step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return start, evaluate()


def test_lora_trained_on_fp8_base_reaches_bf16_eval_loss_within_1pct():
    pytest.importorskip("torchao")
    bf16_start, bf16_end = train_eval_loss(fp8=False)
    fp8_start, fp8_end = train_eval_loss(fp8=True)
    assert bf16_end < 0.95 * bf16_start  # the LoRA learned something, so the comparison means something
    assert fp8_end < 0.95 * fp8_start
    assert fp8_start != bf16_start  # the FP8 base computes differently
    assert abs(fp8_end - bf16_end) <= 0.01 * bf16_end, (fp8_end, bf16_end)


# ---------------------------------------------------------------- TREAD

def tread(*routes) -> TreadConfig:
    return TreadConfig(routes=[TreadRoute(selection_ratio=r, start_layer_idx=s, end_layer_idx=e) for r, s, e in routes])


def forward_inputs(batch: FluxBatch) -> dict:
    from flux_ray.core.flux2 import latents as L
    from flux_ray.core.flux2.text import text_ids

    bs = len(batch.latents)
    return dict(hidden_states=L.pack(batch.latents), encoder_hidden_states=batch.prompt_embeds,
                timestep=torch.full((bs,), 0.6), guidance=None, img_ids=L.latent_ids(1, H, W, CPU)[0],
                txt_ids=text_ids(1, TXT, CPU)[0], return_dict=False)


def by_hand(model, kw: dict, route, kept: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """diffusers' Flux2Transformer2DModel.forward with the route's blocks run on the kept image tokens: double
    blocks take (image, text), single blocks the joint [text; image] sequence."""
    temb = model.time_guidance_embed(kw["timestep"] * 1000, None)
    mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
    mod_single = model.single_stream_modulation(temb)
    img, txt = model.x_embedder(kw["hidden_states"]), model.context_embedder(kw["encoder_hidden_states"])
    t_rope, i_rope = model.pos_embed(kw["txt_ids"]), model.pos_embed(kw["img_ids"])
    rope = (torch.cat([t_rope[0], i_rope[0]]), torch.cat([t_rope[1], i_rope[1]]))
    n_double, full = len(model.transformer_blocks), None
    for i, blk in enumerate(transformer_blocks(model)):
        if i == route.start:
            full, img = img, img[:, kept]
        routed = route.start <= i <= route.end
        r = (rope[0][rows], rope[1][rows]) if routed else rope
        if i < n_double:
            txt, img = blk(hidden_states=img, encoder_hidden_states=txt, temb_mod_img=mod_img, temb_mod_txt=mod_txt,
                           image_rotary_emb=r)
        else:
            joint = blk(hidden_states=torch.cat([txt, img], 1), encoder_hidden_states=None, temb_mod=mod_single,
                        image_rotary_emb=r)
            txt, img = joint[:, :TXT], joint[:, TXT:]
        if i == route.end:
            full = full.clone()
            full[:, kept] = img
            img = full
    return model.proj_out(model.norm_out(img, temb))


@pytest.mark.parametrize("start, end", [(0, 1), (1, 2), (2, 3), (0, -1)],
                         ids=["double-only", "double-to-single", "single-only", "all"])
def test_armed_forward_equals_blocks_run_by_hand_on_kept_tokens(start, end):
    model = build(torch.float32)
    router = TokenRouter.from_spec(model, tread((0.5, start, end)))
    (route,) = resolve_routes(tread((0.5, start, end)).routes, 4)
    batch = batches(1)[0]
    kw = forward_inputs(batch)
    plan = router.plan(TXT, H * W, torch.Generator().manual_seed(5), CPU)
    with torch.no_grad():
        plain = model(**kw)[0]
        with router.active(plan):
            routed = model(**kw)[0]
        expected = by_hand(model, kw, route, *plan[0])
    assert (routed - plain).abs().max() > 1e-4  # routing changed the output, so the match below means something
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], plain)  # disarmed: the plain forward again


def test_tread_trains_the_lora_with_checkpointed_blocks():
    """A route across the double -> single boundary with every block recomputed: gradients reach every LoRA
    factor, and checkpointing gives the same step."""
    def step(ckpt: bool):
        model = build(torch.float32)
        params = lora(model, b_init=0.1)
        router = TokenRouter.from_spec(model, tread((0.5, 1, 2)))  # hooks before checkpointing, as build.py does
        if ckpt:
            apply_gradient_checkpointing(model, 1)
        return loss_and_grads(loss_fn(model, router, autocast=None), params)

    (loss, grads), (ckpt_loss, ckpt_grads) = step(False), step(True)
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close((loss, grads), (ckpt_loss, ckpt_grads), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- group offload

def offload_spec(kind="block_level", disk=None):
    return types.SimpleNamespace(group_offload_type=kind, group_offload_blocks_per_group=1,
                                 group_offload_use_stream=False, group_offload_to_disk_path=disk)


def train_steps(offload=None, steps: int = 3):
    from flux_ray.core.offload import apply_group_offload, keep_unowned_on_device

    model = build(torch.float32)
    if offload is not None:
        apply_group_offload(model, offload, CPU)
    params = lora(model, b_init=0.1)
    if offload is not None:
        keep_unowned_on_device(model, CPU)
    apply_gradient_checkpointing(model, 1)
    fn, opt, batch = loss_fn(model, autocast=None), torch.optim.AdamW(params, lr=1e-2), batches(1)[0]
    losses = []
    for step in range(steps):
        loss = fn(batch, torch.Generator().manual_seed(3 + step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in params]


@functools.lru_cache(maxsize=1)
def plain_training():
    return train_steps()


@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_group_offloaded_training_matches_plain(tmp_path, kind):
    """Offloaded to disk: a weight used while offloaded, or a LoRA restored from the files, would change the numbers."""
    losses, weights = train_steps(offload_spec(kind, disk=str(tmp_path)))
    assert sorted(tmp_path.glob("group_*.safetensors"))
    ref_losses, ref_weights = plain_training()
    assert len(set(losses.tolist())) > 1
    torch.testing.assert_close((losses, weights), (ref_losses, ref_weights), rtol=0, atol=1e-6)
