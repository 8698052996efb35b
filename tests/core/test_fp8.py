"""FP8 compute for the frozen base (core/fp8.py), emulated on a CPU: the same e4m3 rowwise quantisation of
weights, activations and gradients as on an H200, with the GEMMs dequantised to fp32."""
from __future__ import annotations

import pytest
import torch
import yaml

pytest.importorskip("torchao")

from flux_ray.core.checkpointing import apply_gradient_checkpointing  # noqa: E402
from flux_ray.core.compile import compile_blocks  # noqa: E402
from flux_ray.core import fp8 as fp8_module  # noqa: E402
from flux_ray.core.adapters import AdapterSwitch  # noqa: E402
from flux_ray.core.fp8 import Fp8Linear, check_fp8_supported, convert_base_to_fp8  # noqa: E402
from flux_ray.core.fp8_fused import Fp8FusedProjections, Fp8Slice  # noqa: E402
from flux_ray.core.lora import peft_state_dict  # noqa: E402
from flux_ray.core.lora import add_lora  # noqa: E402
from flux_ray.core.model import build_transformer_from_config  # noqa: E402
from flux_ray.core.step import FluxBatch, FluxLossFn  # noqa: E402
from flux_ray.core.tiny import FLUX_SCHEDULER, TINY_TRANSFORMER  # noqa: E402
from flux_ray.core.tread import TokenRouter  # noqa: E402
from flux_ray.spec import FlowSpec, LoraSpec, SpecError, TreadConfig, TreadRoute, load_spec  # noqa: E402

CONFIG = dict(TINY_TRANSFORMER, num_layers=2, num_single_layers=2)
CPU = torch.device("cpu")


def lora_model(fp8: bool, *, ckpt: int = 0, compile_backend=None, b_init: float = 0.0, tread: float = 0.0):
    """Tiny bf16 base with an fp32 LoRA on all+ffs; the base's block Linears in emulated FP8 when ``fp8``."""
    model = build_transformer_from_config(CONFIG, "cpu", torch.bfloat16, seed=0)
    params = add_lora(model, LoraSpec(lora_rank=4, flux_lora_target="all+ffs"))
    if b_init:  # non-zero B, so gradients reach A and the layers below
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(b_init * torch.randn(p.shape, generator=g))
    if fp8:
        assert convert_base_to_fp8(model, CPU, emulate=True) > 0
    router = None
    if tread:  # hooks before checkpointing and compile, as train/build.py orders them
        router = TokenRouter.from_spec(model, TreadConfig(routes=[TreadRoute(
            selection_ratio=tread, start_layer_idx=1, end_layer_idx=-2)]))
    if ckpt:
        apply_gradient_checkpointing(model, ckpt)
    if compile_backend is not None:
        compile_blocks(model, backend=compile_backend)
    fn = FluxLossFn(model, FlowSpec(), scheduler_config=dict(FLUX_SCHEDULER), fast_schedule=False,
                    autocast_dtype=torch.bfloat16, tread=router)
    return model, params, fn


def batches(n: int, bs: int = 2, seed: int = 2) -> list[FluxBatch]:
    g = torch.Generator().manual_seed(seed)
    return [FluxBatch(torch.randn(bs, 16, 8, 8, generator=g), torch.randn(bs, 7, 32, generator=g),
                      torch.randn(bs, 32, generator=g)) for _ in range(n)]


def loss_and_grads(fn, params):
    loss = fn(batches(1)[0], torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in params]


def test_block_linears_become_fp8_the_rest_stays():
    model, params, _ = lora_model(fp8=True)
    blk = model.single_transformer_blocks[0]
    assert isinstance(blk.proj_out.base_layer, Fp8Linear) and isinstance(blk.proj_mlp.base_layer, Fp8Slice)
    assert type(blk.norm.linear) is torch.nn.Linear  # AdaLN: one row a sample, left in bf16
    assert type(model.proj_out.base_layer) is torch.nn.Linear  # outside the blocks: bf16
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight_fp8.dtype == m.weight_t_fp8.dtype == torch.uint8 for m in fp8)  # e4m3 bits
    model.to(torch.float32)  # what moves floating-point weights leaves the FP8 bits alone
    assert all(m.weight_fp8.dtype == torch.uint8 for m in fp8)
    assert all(not p.requires_grad for m in fp8 for p in m.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)  # LoRA A/B untouched


def test_shared_input_projections_become_one_fp8_gemm_and_keep_their_peft_loras():
    """A double block's q/k/v (and text q/k/v) run as diffusers' own fused ``to_qkv`` / ``to_added_qkv``; a
    single block's MLP input and q/k/v as one GEMM. The LoRA parameters stay in the members' PEFT layers."""
    model, params, _ = lora_model(fp8=True, b_init=0.1)
    unfused = lora_model(fp8=False, b_init=0.1)[0]
    for blk in model.transformer_blocks:
        attn = blk.attn
        assert attn.fused_projections and isinstance(attn.to_qkv, Fp8FusedProjections)
        assert isinstance(attn.to_added_qkv, Fp8FusedProjections)
        assert isinstance(attn.to_q.base_layer, Fp8Slice) and attn.to_qkv.sizes == [attn.to_q.out_features] * 3
    for blk in model.single_transformer_blocks:
        assert blk.proj_mlp_qkv.sizes == [blk.proj_mlp.out_features] + [blk.attn.to_q.out_features] * 3
        assert isinstance(blk.attn.to_v.base_layer, Fp8Slice) and "forward" in vars(blk)
    assert peft_state_dict(model).keys() == peft_state_dict(unfused).keys()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in unfused.named_parameters() if p.requires_grad]  # the optimizer's and checkpoints' view
    attn = model.transformer_blocks[0].attn
    attn.to_q.scaling["default"], attn.to_v.scaling["default"] = 0.5, 2.0  # alpha / r, its own per member
    x = torch.randn(2, 9, attn.to_q.in_features, dtype=torch.bfloat16)
    fused = attn.to_qkv(x)  # the fused A / block-diagonal B against PEFT's own forward of each member
    members = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
    lora_part = fused - attn.to_qkv.base(x)
    assert lora_part.abs().max() > 0.01  # the LoRA contributes, so the comparison means something
    torch.testing.assert_close(fused, members, rtol=1e-2, atol=1e-2)
    attn.to_k.lora_dropout["default"] = torch.nn.Dropout(0.5).eval()  # PEFT's per-member path, same output
    torch.testing.assert_close(attn.to_qkv(x), fused, rtol=0, atol=1e-2)
    with AdapterSwitch(model).off():  # adapters off: the base GEMM alone
        torch.testing.assert_close(attn.to_qkv(x), attn.to_qkv.base(x), rtol=0, atol=0)


def test_fused_single_block_is_diffusers_forward():
    """``single_block_forward`` (one GEMM for the MLP input and q/k/v) against diffusers' own block forward
    running each member alone (its rows of the same FP8 GEMM plus its PEFT LoRA)."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, _get_projections

    model, _, _ = lora_model(fp8=True, b_init=0.1)
    blk, g = model.single_transformer_blocks[0], torch.Generator().manual_seed(5)
    dim = blk.attn.inner_dim
    hidden, text, temb = (torch.randn(2, n, dim, generator=g, dtype=torch.bfloat16) for n in (12, 5, 1))
    rope = model.pos_embed(torch.randn(17, 3, generator=g))
    fused = blk(hidden, text, temb[:, 0], image_rotary_emb=rope)
    attn = blk.attn
    members = {"forward": lambda self, x: torch.cat(_get_projections(attn, x)[:3], -1)}  # each member alone
    attn.to_qkv = type("Members", (torch.nn.Module,), members)()
    reference = FluxSingleTransformerBlock.forward(blk, hidden, text, temb[:, 0], image_rotary_emb=rope)
    for a, b in zip(fused, reference):
        assert a.shape == b.shape and (b - b.mean()).abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_fused_projections_step_tracks_the_unfused_fp8_step(monkeypatch):
    """Fusing changes only the scales shared across q/k/v (the weight's per-column and the gradient's per-row
    amax): the step stays the per-projection FP8 step's."""
    loss, grads = fp8_step()
    monkeypatch.setattr(fp8_module, "FUSE_PROJECTIONS", False)
    model, params, fn = lora_model(fp8=True, b_init=0.1)
    assert not any(isinstance(m, Fp8FusedProjections) for m in model.modules())
    ref_loss, ref_grads = loss_and_grads(fn, params)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in ref_grads]), dim=0)
    assert cos > 0.999 and abs(loss - ref_loss) < 0.005 * ref_loss


def test_fp8_linear_matches_bf16_and_saves_no_activation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False)
    fp8 = Fp8Linear(lin, emulate=True)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    assert {t.dtype for t in saved} <= {torch.float8_e4m3fn, torch.float32}  # the W^T copy (a view) and its scales
    assert not any(t.shape[0] == 3 * 5 or t.shape[:1] == (3,) for t in saved)  # nothing activation-sized
    ref = lin(x)
    g = torch.randn_like(ref)
    (grad,), (ref_grad,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    # e4m3 keeps 3 mantissa bits: a few % of the output scale, never more
    assert 0 < (y - ref).abs().max() < 0.06 * ref.abs().max()
    assert 0 < (grad - ref_grad).abs().max() < 0.06 * ref_grad.abs().max()
    assert grad.dtype == x.dtype and y.dtype == torch.bfloat16


def test_scaled_mm_path_equals_the_emulation():
    """The GPU path (``_scaled_mm``: row-major activations, column-major weight copies, rowwise scales),
    run by torch's CPU kernel where it has one, computes what the emulation computes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 20, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 20, 48, dtype=torch.bfloat16)
    outs = []
    for emulate in (True, False):
        try:
            y = Fp8Linear(lin, emulate=emulate)(x)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"no CPU _scaled_mm in this torch: {e}")
        outs.append((y, *torch.autograd.grad(y, x, g)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_input_gradients_flow_to_the_lowest_lora_and_the_base_stays_frozen():
    model, params, fn = lora_model(fp8=True, b_init=0.1)
    _, ref_params, ref_fn = lora_model(fp8=False, b_init=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss, grads = loss_and_grads(fn, params)
    ref_loss, ref_grads = loss_and_grads(ref_fn, ref_params)
    assert all(p.grad is None for n, p in model.named_parameters() if n in before)  # no weight gradient
    first = [g for (n, _), g in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), grads)
             if n.startswith("transformer_blocks.0.")]
    assert first and all(g.abs().sum() > 0 for g in first)  # through every FP8 block above it
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in ref_grads]), dim=0)
    assert cos > 0.99 and abs(loss - ref_loss) < 0.02 * ref_loss
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def fp8_step(fp8: bool = True, **kwargs):
    _, params, fn = lora_model(fp8=fp8, b_init=0.1, **kwargs)
    return loss_and_grads(fn, params)


def test_checkpointing_gives_the_same_step():
    plain, ckpt = fp8_step(), fp8_step(ckpt=1)
    torch.testing.assert_close(plain, ckpt, rtol=0, atol=0)


def test_tread_routes_tokens_through_fp8_blocks():
    """TREAD (half the image tokens skip blocks 1..-2) with every block checkpointed: the FP8 blocks see the
    shorter sequences, and the step stays the bf16 base's step up to FP8 error."""
    (loss, grads), (ref_loss, ref_grads) = fp8_step(tread=0.5, ckpt=1), fp8_step(tread=0.5, fp8=False)
    assert all(g.abs().sum() > 0 for g in grads)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                torch.cat([g.flatten() for g in ref_grads]), dim=0)
    assert cos > 0.99 and abs(loss - ref_loss) < 0.02 * ref_loss


def test_compiled_blocks_one_graph_each_and_same_step():
    """AOT autograd traces the FP8 Function (forward and its input-gradient backward) into each block's
    graph: as many graphs as the bf16 base compiles to, no graph break."""
    from torch._dynamo.utils import counters

    def graphs(fp8: bool) -> tuple[int, tuple]:
        torch._dynamo.reset()
        counters.clear()
        model, params, fn = lora_model(fp8=fp8, ckpt=2, compile_backend="aot_eager", b_init=0.1)
        out = loss_and_grads(fn, params)
        assert not counters["graph_break"], dict(counters["graph_break"])
        return counters["stats"]["unique_graphs"], out

    bf16_graphs, _ = graphs(False)
    fp8_graphs, compiled = graphs(True)
    assert fp8_graphs == bf16_graphs > 0
    eager = fp8_step(ckpt=2)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-4)


def train_eval_loss(fp8: bool, steps: int = 20) -> tuple[float, float]:
    """(eval loss before, after) ``steps`` AdamW steps of the LoRA on two fixed batches (the trainer's
    eval: fixed noise, a fixed sigma grid)."""
    torch.manual_seed(0)
    model, params, fn = lora_model(fp8=fp8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = batches(2)

    def evaluate() -> float:
        return float(torch.cat([fn.eval_loss(b, [10 * i, 10 * i + 1], 3) for i, b in enumerate(data)]).mean())

    start = evaluate()
    for step in range(steps):
        fn(data[step % len(data)], torch.Generator().manual_seed(100 + step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return start, evaluate()


def test_lora_trained_on_fp8_base_reaches_bf16_eval_loss_within_1pct():
    bf16_start, bf16_end = train_eval_loss(fp8=False)
    fp8_start, fp8_end = train_eval_loss(fp8=True)
    assert bf16_end < 0.95 * bf16_start  # the LoRA learned something, so the comparison means something
    assert fp8_end < 0.95 * fp8_start
    assert fp8_start != bf16_start  # the FP8 base computes differently
    assert abs(fp8_end - bf16_end) <= 0.01 * bf16_end, (fp8_end, bf16_end)


def _ddp_rank(rank: int, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    # a file rendezvous: a free TCP port picked beforehand can be taken by a parallel test's Ray in between
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(rank)  # different bases on each rank: DDP's broadcast at wrap must make them rank 0's
    lora_a = torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(lora_a, Fp8Linear(torch.nn.Linear(32, 16).requires_grad_(False), emulate=True))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(10 + rank))
    ddp(x).square().sum().backward()
    torch.save({"bits": model[1].weight_fp8.detach(), "grad": lora_a.weight.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_broadcasts_the_fp8_base_and_all_reduces_the_adapter(tmp_path):
    """Two gloo ranks: the FP8 weights survive DDP's broadcast (an fp8 dtype would not: "Invalid scalar
    type"), and the trainable layer below the FP8 one gets the same averaged gradient on both."""
    torch.multiprocessing.spawn(_ddp_rank, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["bits"], r1["bits"])
    assert r0["grad"].abs().sum() > 0 and torch.equal(r0["grad"], r1["grad"])


def test_refused_without_fp8_tensor_cores():
    model = build_transformer_from_config(CONFIG, "cpu", torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match=r"model.base_compute_dtype='fp8' needs an NVIDIA GPU with FP8 tensor cores"):
        convert_base_to_fp8(model, CPU)
    with pytest.raises(ValueError, match="this worker runs on cpu"):
        check_fp8_supported(CPU)
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())


@pytest.mark.parametrize("model, scaling, lora, expected", [
    ({}, {}, {}, "model.base_compute_dtype fp8 needs GPUs with FP8 tensor cores (compute capability 8.9+); "
                 "scaling.use_gpu is false"),
    ({}, {"use_gpu": True, "strategy": "fsdp"}, {}, "model.base_compute_dtype fp8 cannot be used with scaling.strategy fsdp"),
    ({}, {"use_gpu": True}, {"lora_type": "lycoris"}, "model.base_compute_dtype fp8 needs lora.lora_type standard"),
    ({"base_model_precision": "fp8-torchao"}, {"use_gpu": True}, {},
     "it needs model.base_model_precision no_change (got 'fp8-torchao')"),
])
def test_spec_refuses_what_fp8_cannot_run(tmp_path, demo_data_dir, model, scaling, lora, expected):
    data = {"name": "t", "datasets": [{"id": "d", "instance_data_dir": demo_data_dir}],
            "output": {"uri": str(tmp_path / "out")}, "cache": {"uri": str(tmp_path / "cache")},
            "model": dict(model, base_compute_dtype="fp8"), "scaling": scaling, "lora": lora}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as e:
        load_spec(str(path))
    assert expected in str(e.value)
    data["scaling"] = {"use_gpu": True}
    data["model"], data["lora"] = {"base_compute_dtype": "fp8"}, {}
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(str(path))
    assert spec.model.base_compute_dtype == "fp8"
    from flux_ray.train.build import build_transformer

    with pytest.raises(ValueError, match="this worker runs on cpu"):  # the worker's check, before the load
        build_transformer(spec, CPU)
