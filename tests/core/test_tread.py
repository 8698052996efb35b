"""TREAD routing on a tiny Flux (2 double + 3 single blocks, fp32, CPU): the routed forward is the hand-made one."""
from __future__ import annotations

import pytest
import torch

from flux_ray.core import flow as F
from flux_ray.core.checkpointing import apply_gradient_checkpointing, transformer_blocks
from flux_ray.core.lora import add_lora
from flux_ray.core.model import build_transformer_from_config
from flux_ray.core.step import FluxBatch, FluxLossFn
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER
from flux_ray.core.tread import TokenRouter, num_kept, resolve_routes
from flux_ray.spec import FlowSpec, LoraSpec, TreadConfig, TreadRoute

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=3)
TXT, H, W = 7, 8, 8  # 7 text tokens, 16 image tokens (latents 8x8 -> 4x4 patches)
IMG = (H // 2) * (W // 2)


def tread(*routes) -> TreadConfig:
    return TreadConfig(routes=[TreadRoute(selection_ratio=r, start_layer_idx=s, end_layer_idx=e) for r, s, e in routes])


def make_model(lora: bool = False):
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    params = []
    if lora:
        params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero B, so A gets gradients too
            for p in params:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, params


def make_batch(bs: int = 2, masked: bool = False) -> FluxBatch:
    g = torch.Generator().manual_seed(2)
    text_mask = None
    if masked:
        text_mask = torch.ones(bs, TXT, dtype=torch.int8)
        text_mask[:, 4:] = 0
    smooth = torch.nn.functional.interpolate(torch.randn(bs, 16, 2, 2, generator=g), size=(H, W), mode="bilinear")
    return FluxBatch(smooth, torch.randn(bs, TXT, 32, generator=g), torch.randn(bs, 32, generator=g), text_mask)


def forward_inputs(batch: FluxBatch, masked: bool = False) -> dict:
    kw = dict(hidden_states=F.pack_latents(batch.latents), encoder_hidden_states=batch.prompt_embeds,
              pooled_projections=batch.pooled, timestep=torch.full((len(batch.pooled),), 0.6),
              guidance=torch.full((len(batch.pooled),), 3.5), img_ids=F.latent_image_ids(H, W, device="cpu"),
              txt_ids=F.text_ids(TXT, device="cpu"), return_dict=False)
    if masked:
        kw["joint_attention_kwargs"] = {"attention_mask": F.joint_attention_mask(batch.text_mask, IMG)}
    return kw


def by_hand(model, kw: dict, routes, plan) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel.forward with each route's blocks run on the gathered subsequence."""
    hs = model.x_embedder(kw["hidden_states"])
    temb = model.time_text_embed(kw["timestep"] * 1000, kw["guidance"] * 1000, kw["pooled_projections"])
    txt = model.context_embedder(kw["encoder_hidden_states"])
    rope = model.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    mask = (kw.get("joint_attention_kwargs") or {}).get("attention_mask")
    blocks, i = transformer_blocks(model), 0
    while i < len(blocks):
        route = next((r for r in routes if r.start == i), None)
        if route is None:
            txt, hs = blocks[i](hidden_states=hs, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope,
                                joint_attention_kwargs=None if mask is None else {"attention_mask": mask})
            i += 1
            continue
        kept, rows = plan[routes.index(route)]
        sub, sub_rope = hs[:, kept], (rope[0][rows], rope[1][rows])
        sub_extra = None if mask is None else {"attention_mask": mask[..., rows]}
        for blk in blocks[route.start:route.end + 1]:
            txt, sub = blk(hidden_states=sub, encoder_hidden_states=txt, temb=temb, image_rotary_emb=sub_rope,
                           joint_attention_kwargs=sub_extra)
        hs = hs.clone()
        hs[:, kept] = sub
        i = route.end + 1
    return model.proj_out(model.norm_out(hs, temb))


def test_unarmed_router_leaves_forward_unchanged():
    model, _ = make_model()
    kw = forward_inputs(make_batch())
    with torch.no_grad():
        plain = model(**kw)[0]
        TokenRouter.from_spec(model, tread((0.5, 1, -2)))
        assert torch.equal(model(**kw)[0], plain)
    assert TokenRouter.from_spec(model, None) is None


def test_routed_tokens_skip_blocks_and_text_tokens_stay():
    model, _ = make_model()
    router = TokenRouter.from_spec(model, tread((0.25, 1, -2)))  # blocks 1..3
    blocks = transformer_blocks(model)
    seen, start_in, end_out = [], {}, {}
    for blk in blocks:  # registered after the router's hooks: they see what the block runs on
        blk.register_forward_pre_hook(
            lambda m, a, k: seen.append((k["encoder_hidden_states"].shape[1], k["hidden_states"].shape[1])),
            with_kwargs=True)
    blocks[1].register_forward_pre_hook(lambda m, a, k: start_in.update(x=k["hidden_states"]), with_kwargs=True,
                                        prepend=True)
    blocks[3].register_forward_hook(lambda m, a, out: end_out.update(x=out[1]))
    plan = router.plan(TXT, IMG, torch.Generator().manual_seed(0), torch.device("cpu"))
    with torch.no_grad(), router.active(plan):
        model(**forward_inputs(make_batch()))
    keep = num_kept(IMG, 0.25)
    assert keep == 12
    assert seen == [(TXT, IMG), (TXT, keep), (TXT, keep), (TXT, keep), (TXT, IMG)]
    kept = plan[0][0]
    routed = torch.tensor([i for i in range(IMG) if i not in set(kept.tolist())])
    assert len(routed) == IMG - keep
    assert torch.equal(end_out["x"][:, routed], start_in["x"][:, routed])
    assert not torch.allclose(end_out["x"][:, kept], start_in["x"][:, kept])


@pytest.mark.parametrize("routes, masked", [
    (((0.5, 1, -2),), False),                  # double -> single blocks
    (((0.5, 0, 1), (0.25, -2, -1)), True),     # two routes, joint attention mask routed too
])
def test_armed_forward_equals_blocks_run_by_hand_on_kept_tokens(routes, masked):
    model, _ = make_model()
    router = TokenRouter.from_spec(model, tread(*routes))
    kw = forward_inputs(make_batch(masked=masked), masked=masked)
    plan = router.plan(TXT, IMG, torch.Generator().manual_seed(5), torch.device("cpu"))
    with torch.no_grad():
        with router.active(plan):
            routed = model(**kw)[0]
        ref = by_hand(model, kw, router.routes, plan)
        plain = model(**kw)[0]
    torch.testing.assert_close(routed, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(routed, plain, atol=1e-3)


def loss_fn(model, router, attention_backend: str = "math", **kw) -> FluxLossFn:
    return FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False,
                      attention_backend=attention_backend, tread=router, **kw)


def test_lora_gets_gradients_and_checkpointing_agrees():
    grads = {}
    for ckpt in (0, 1):
        model, params = make_model(lora=True)
        router = TokenRouter.from_spec(model, tread((0.5, 1, -2)))
        if ckpt:  # the recomputation runs on the gathered input the hook made
            apply_gradient_checkpointing(model, ckpt)
        loss = loss_fn(model, router)(make_batch(), torch.Generator().manual_seed(3))
        loss.backward()
        grads[ckpt] = (loss.detach(), [p.grad.clone() for p in params])
    assert all(g.abs().sum() > 0 for g in grads[0][1])
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_with_tread_lowers_eval_loss():
    model = build_transformer_from_config(CONFIG, "cpu", torch.float32, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    fn = loss_fn(model, TokenRouter.from_spec(model, tread((0.5, 1, -2))))
    batch = make_batch()
    before = fn.eval_loss(batch, [0, 1], num_sigmas=4).mean()
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(15):
        fn(batch, torch.Generator().manual_seed(step)).backward()
        opt.step()
        opt.zero_grad()
    after = fn.eval_loss(batch, [0, 1], num_sigmas=4).mean()
    assert after < 0.9 * before, (before, after)


def test_same_generator_same_routing_and_eval_loss_never_routed():
    model, _ = make_model(lora=True)
    router = TokenRouter.from_spec(model, tread((0.5, 1, -2)))
    plans = [router.plan(TXT, IMG, torch.Generator().manual_seed(s), torch.device("cpu"))[0][0] for s in (7, 7, 8)]
    assert torch.equal(plans[0], plans[1]) and not torch.equal(plans[0], plans[2])
    batch = make_batch(masked=True)
    routed, plain = loss_fn(model, router, masked_attention=True), loss_fn(model, None, masked_attention=True)
    with torch.no_grad():
        a, b = (routed(batch, torch.Generator().manual_seed(7)) for _ in range(2))
        c = plain(batch, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(routed.eval_loss(batch, [0, 1], 3), plain.eval_loss(batch, [0, 1], 3))


@pytest.mark.parametrize("routes, expected", [
    (((0.5, 0, 5),), r"routes\[0\]\.end_layer_idx=5 is out of range for a transformer of 5 blocks"),
    (((0.5, -6, 2),), r"routes\[0\]\.start_layer_idx=-6 is out of range"),
    (((0.5, 3, -4),), r"routes\[0\]: start_layer_idx=3 \(block 3\) comes after end_layer_idx=-4 \(block 1\)"),
    (((0.5, 3, 4), (0.5, 0, 3)), r"routes\[0\] \(blocks 3\.\.4\) overlaps train\.tread_config\.routes\[1\]"),
])
def test_bad_route_indices_name_the_route(routes, expected):
    with pytest.raises(ValueError, match=r"train\.tread_config\." + expected):
        resolve_routes(tread(*routes).routes, 5)


@pytest.mark.slow  # dynamo traces each block kind and hook: about 25 s on a small CPU
def test_compiled_checkpointed_blocks_route_like_eager():
    """Regional compile: dynamo traces the blocks and these hooks (its eager backend: no inductor codegen).

    "auto" SDPA: the eager backend runs the checkpoint eagerly, and its recomputation would not re-enter an
    explicit sdpa_kernel (inductor traces it into the graph; see core/checkpointing.py)."""
    out = []
    for compiled in (False, True):
        model, params = make_model(lora=True)
        router = TokenRouter.from_spec(model, tread((0.5, 1, -2)))
        apply_gradient_checkpointing(model, 2)
        if compiled:
            for blk in transformer_blocks(model):
                blk.compile(backend="eager")
        loss = loss_fn(model, router, "auto")(make_batch(), torch.Generator().manual_seed(3))
        loss.backward()
        out.append((loss.detach(), [p.grad for p in params]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
