"""LoRA export: every format is loaded back by diffusers' own loader and gives the trained model's output.

The reference is the in-training PEFT model (``add_lora`` with random, non-zero A and B, alpha != rank).
Each exported file is loaded with ``FluxPipeline.load_lora_weights`` into a fresh base transformer and
must give the same output for fixed inputs; merged weights must too.

Why three test transformers: diffusers' kohya converter hard-codes Flux.1's single-block split sizes
(3 x 3072 + 12288) for ``linear1``, so a single-block q/k/v/proj_mlp LoRA in BFL layout can only be
loaded by diffusers into a transformer of hidden size 3072 (``wide_single``: 0 double + 1 single block
at full width). BFL-layout round trips of each preset are therefore split: its double-block and
top-level modules on ``tiny_double`` (2 double blocks), its single-block modules on ``wide_single``.
"""
from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux_ray.core import bfl_names
from flux_ray.core.lora import add_lora, matching_modules, peft_state_dict, save_diffusers_lora
from flux_ray.core.lora_export import export_lora_file, merge_lora, read_lora
from flux_ray.export import export_cli
from flux_ray.core.model import FLUX_DEV_TRANSFORMER
from flux_ray.core.tiny import TINY_TRANSFORMER
from flux_ray.spec import LORA_TARGET_PRESETS, LoraSpec, load_spec

RANK, ALPHA = 4, 12.0  # scale 3: a loader that drops alpha is off by 3x
PRESETS = ["mmdit", "all", "all+ffs", "context", "context+ffs"]
TINY_DOUBLE = {**TINY_TRANSFORMER, "num_layers": 2, "num_single_layers": 0}
WIDE_SINGLE = dict(patch_size=1, in_channels=4, num_layers=0, num_single_layers=1, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False,
                   axes_dims_rope=(16, 56, 56))


# ---------------------------------------------------------------- helpers

def build_transformer(config: dict, seed: int = 0):
    """A random transformer; large ones are filled from a seeded bank (default init of 180M params is slow)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    if config["attention_head_dim"] * config["num_attention_heads"] < 1024:
        return FluxTransformer2DModel(**config).eval()
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu").eval()
    bank = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed)) * 0.02
    for i, p in enumerate(model.parameters()):
        flat, pos, off = p.data.view(-1), 0, (i * 7919) % 100_000
        while pos < flat.numel():
            k = min(flat.numel() - pos, bank.numel() - off)
            flat[pos:pos + k] = bank[off:off + k]
            pos, off = pos + k, 0
    return model


def fixed_inputs(transformer, seed: int = 1) -> dict:
    from diffusers import FluxPipeline

    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    inputs = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.6]), txt_ids=torch.zeros(6, 3),
                  img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@torch.no_grad()
def forward(transformer, inputs) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


def train_lora(transformer, lora_spec: LoraSpec, seed: int = 0) -> dict:
    """Attach the LoRA as training does and give A and B random non-zero values; returns the PEFT state."""
    add_lora(transformer, lora_spec)
    g = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if ".lora_A." in name:
            p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        elif ".lora_B." in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return peft_state_dict(transformer)


def preset_spec(transformer, preset: str) -> LoraSpec:
    """The preset, restricted to the targets this (partial) transformer has."""
    targets = [t for t in LORA_TARGET_PRESETS[preset] if matching_modules(transformer, t)]
    return LoraSpec(lora_rank=RANK, lora_alpha=ALPHA, flux_lora_target=preset, peft_lora_target_modules=targets)


def load_with_diffusers(transformer, path: Path, expect_modules: set[str]):
    """``FluxPipeline.load_lora_weights`` into ``transformer``; checks no trained module was left out.

    diffusers' kohya converter (0.42) names ``final_layer`` / embedder LoRAs without the ``transformer.``
    prefix, so ``load_lora_weights`` would drop them silently (see ``test_diffusers_drops_unprefixed_final_layer``):
    for such files the converter's output is re-prefixed and passed in as a dict.
    """
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    converted = FluxPipeline.lora_state_dict(str(path))
    stray = [k for k in converted if not k.startswith("transformer.")]
    if stray:
        pipe.load_lora_weights({("transformer." + k if k in stray else k): v for k, v in converted.items()})
    else:
        pipe.load_lora_weights(str(path))
    adapted = {n.split(".lora_A.")[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    assert expect_modules <= adapted, sorted(expect_modules - adapted)
    return transformer


def assert_same_output(out, ref, base):
    assert (ref - base).abs().max() > 1e-2, "the LoRA barely changes the output: the test would prove nothing"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


def round_trip(transformer, lora_spec, fmt, tmp_path) -> None:
    """Train (random) -> diffusers file -> export fmt -> load with diffusers -> same output."""
    inputs = fixed_inputs(transformer)
    base = forward(transformer, inputs)
    peft_sd = train_lora(transformer, lora_spec)
    ref = forward(transformer, inputs)
    trained = {k.split(".lora_A.")[0] for k in peft_sd if ".lora_A." in k}
    src = save_diffusers_lora(tmp_path / "src", peft_sd, lora_spec)
    path = export_lora_file(src, fmt, tmp_path / fmt)
    transformer.unload_lora()  # back to the base (a left-over adapter would double the delta and fail)
    out = forward(load_with_diffusers(transformer, path, trained), inputs)
    transformer.unload_lora()
    assert_same_output(out, ref, base)


@pytest.fixture(scope="module")
def wide_single():
    return build_transformer(WIDE_SINGLE)


def tiny_transformer(tiny_model_dir):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()


# ---------------------------------------------------------------- round trips through diffusers' loader

@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_format_round_trip(tiny_model_dir, tmp_path, preset):
    t = tiny_transformer(tiny_model_dir)
    round_trip(t, preset_spec(t, preset), "diffusers", tmp_path)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("preset", PRESETS)
def test_bfl_format_round_trip_double_blocks(tmp_path, preset, fmt):
    t = build_transformer(TINY_DOUBLE)
    round_trip(t, preset_spec(t, preset), fmt, tmp_path)


@pytest.mark.parametrize("fmt,preset", [("kohya", "mmdit"), ("comfyui", "all+ffs")])
def test_bfl_format_round_trip_single_blocks(wide_single, tmp_path, preset, fmt):
    """Single-block linear1 = [q; k; v; proj_mlp]. mmdit (and all, same single-block targets) trains q/k/v
    only, so the proj_mlp block is zero; all+ffs trains all four, linear2 and the final layer too.
    (kohya vs comfyui differ only in key names, covered on every preset by the double-block test.)"""
    round_trip(wide_single, preset_spec(wide_single, preset), fmt, tmp_path)


def test_merged_transformer_matches_peft(tiny_model_dir, tmp_path):
    t = tiny_transformer(tiny_model_dir)
    inputs = fixed_inputs(t)
    base = forward(t, inputs)
    lora_spec = preset_spec(t, "all+ffs")
    src = save_diffusers_lora(tmp_path, train_lora(t, lora_spec), lora_spec)
    ref = forward(t, inputs)
    merged = merge_lora(tiny_transformer(tiny_model_dir), src)
    assert_same_output(forward(merged, inputs), ref, base)


def test_comfyui_semantics_patch_equals_merged_weights(tiny_model_dir, tmp_path):
    """Apply the file as ComfyUI does (W_bfl += alpha / down.shape[0] * up @ down) on BFL-layout weights of
    every Linear of the tiny model: it equals the merged diffusers weights, fused the same way."""
    t = tiny_transformer(tiny_model_dir)
    every_linear = [n for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)]
    lora_spec = LoraSpec(lora_rank=RANK, lora_alpha=ALPHA, peft_lora_target_modules=every_linear)
    src = save_diffusers_lora(tmp_path, train_lora(t, lora_spec), lora_spec)
    base, merged = tiny_transformer(tiny_model_dir), merge_lora(tiny_transformer(tiny_model_dir), src)
    patched = to_bfl_weights(base)
    sd = load_file(export_lora_file(src, "comfyui", tmp_path / "c"))
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        down, up, alpha = sd[key], sd[name + ".lora_up.weight"], sd[name + ".alpha"].item()
        patched[name.removeprefix("diffusion_model.")] += alpha / down.shape[0] * up @ down
    expected = to_bfl_weights(merged)
    assert patched.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(patched[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def to_bfl_weights(transformer) -> dict[str, torch.Tensor]:
    """Base weights of the diffusers model arranged as BFL's modules (fused rows, final adaLN swapped)."""
    parts: dict[str, dict] = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            target = bfl_names.to_bfl(name)
            parts.setdefault(target.module, {})[target.part] = m.weight.detach().clone()
    out = {k: torch.cat([v[i] for i in sorted(v)]) if None not in v else v[None] for k, v in parts.items()}
    w = out["final_layer.adaLN_modulation.1"]
    out["final_layer.adaLN_modulation.1"] = torch.cat(w.chunk(2)[::-1])
    return out


# ---------------------------------------------------------------- alpha and fusing rules

def test_alpha_tensors_keep_alpha_over_rank(tmp_path):
    t = build_transformer(TINY_DOUBLE)
    lora_spec = LoraSpec(lora_rank=RANK, lora_alpha=ALPHA, peft_lora_target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"])
    src = save_diffusers_lora(tmp_path, train_lora(t, lora_spec), lora_spec)
    sd = load_file(export_lora_file(src, "kohya", tmp_path / "k"))
    qkv = "lora_unet_double_blocks_1_img_attn_qkv"
    assert sd[f"{qkv}.lora_down.weight"].shape == (3 * RANK, 32)
    assert sd[f"{qkv}.lora_up.weight"].shape == (3 * 32, 3 * RANK)
    assert sd[f"{qkv}.alpha"].item() == 3 * ALPHA  # rank 3r, same alpha / rank
    txt = "lora_unet_double_blocks_0_txt_attn_qkv"  # only add_q trained: k, v blocks are zero of rank r
    assert sd[f"{txt}.alpha"].item() == 3 * ALPHA
    assert sd[f"{txt}.lora_up.weight"][32:].abs().sum() == 0 and sd[f"{txt}.lora_down.weight"][RANK:].abs().sum() == 0
    assert sd["lora_unet_double_blocks_0_img_attn_proj.alpha"].item() == ALPHA
    # final_layer: diffusers ignores its .alpha, so the scale is in lora_up and alpha == rank
    assert sd["lora_unet_final_layer_linear.alpha"].item() == RANK
    peft = load_file(src)
    torch.testing.assert_close(sd["lora_unet_final_layer_linear.lora_up.weight"],
                               peft["transformer.proj_out.lora_B.weight"] * ALPHA / RANK)


def test_diffusers_drops_unprefixed_final_layer():
    """Canary for the workaround in load_with_diffusers: diffusers' kohya converter emits final_layer keys
    without ``transformer.``. If this fails, diffusers fixed it and the workaround can go."""
    from diffusers import FluxPipeline

    sd = {"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 3072),
          "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(64, 2),
          "lora_unet_final_layer_linear.alpha": torch.tensor(2.0)}
    assert set(FluxPipeline.lora_state_dict(sd)) == {"proj_out.lora_A.weight", "proj_out.lora_B.weight"}


# ---------------------------------------------------------------- full-size key layout

BFL_DOUBLE = {"img_mod.lin": (6, 1), "img_attn.qkv": (3, 1), "img_attn.proj": (1, 1), "img_mlp.0": (4, 1),
              "img_mlp.2": (1, 4), "txt_mod.lin": (6, 1), "txt_attn.qkv": (3, 1), "txt_attn.proj": (1, 1),
              "txt_mlp.0": (4, 1), "txt_mlp.2": (1, 4)}  # (out, in) in units of hidden size
BFL_SINGLE = {"linear1": (7, 1), "linear2": (1, 5), "modulation.lin": (3, 1)}


def bfl_flux_dev_linears() -> dict[str, tuple[int, int]]:
    """Every Linear of BFL's Flux.1-dev (black-forest-labs/flux src/flux/model.py, modules/layers.py)."""
    h = 3072
    out = {f"double_blocks.{i}.{n}": (a * h, b * h) for i in range(19) for n, (a, b) in BFL_DOUBLE.items()}
    out.update({f"single_blocks.{i}.{n}": (a * h, b * h) for i in range(38) for n, (a, b) in BFL_SINGLE.items()})
    out.update({"img_in": (h, 64), "txt_in": (h, 4096), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
                "vector_in.in_layer": (h, 768), "vector_in.out_layer": (h, h), "guidance_in.in_layer": (h, 256),
                "guidance_in.out_layer": (h, h), "final_layer.linear": (64, h),
                "final_layer.adaLN_modulation.1": (2 * h, h)})
    return out


@pytest.fixture(scope="module")
def full_size_lora(tmp_path_factory) -> Path:
    """A rank-1 LoRA on every Linear of the full-size Flux.1-dev (shapes from the meta-device model)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(1, m.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 1, generator=g)
    path = tmp_path_factory.mktemp("full") / "full.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 1, "transformer.lora_alpha": 2.0})})
    return path


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_full_size_keys_are_bfl_modules(full_size_lora, tmp_path, fmt):
    expected = bfl_flux_dev_linears()
    name_of = {bfl_names.kohya_name(n) if fmt == "kohya" else bfl_names.comfyui_name(n): n for n in expected}
    sd = load_file(export_lora_file(full_size_lora, fmt, tmp_path))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert modules <= set(name_of), sorted(modules - set(name_of))[:5]
    assert len(modules) == len(expected)  # every Linear of Flux.1-dev has a LoRA here
    for key in modules:
        out_features, in_features = expected[name_of[key]]
        assert sd[f"{key}.lora_up.weight"].shape[0] == out_features, key
        assert sd[f"{key}.lora_down.weight"].shape[1] == in_features, key
        assert sd[f"{key}.alpha"].ndim == 0


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_full_size_diffusers_converter_maps_back_exactly(full_size_lora, tmp_path, fmt, monkeypatch):
    """diffusers' converter turns the full-size file back into every original module, nothing left over,
    with the same delta (checked on a random probe vector: scale * B (A x))."""
    from diffusers.loaders import lora_conversion_utils as conv

    warnings = []
    monkeypatch.setattr(conv.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    exported = load_file(export_lora_file(full_size_lora, fmt, tmp_path))
    back = conv._convert_kohya_flux_lora_to_diffusers(exported)
    assert not warnings, warnings
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    original = {k.removeprefix("transformer."): v for k, v in load_file(full_size_lora).items()}
    assert set(back) == set(original)
    g = torch.Generator().manual_seed(1)
    for key in [k for k in original if k.endswith(".lora_A.weight")]:
        b_key = key.replace(".lora_A.", ".lora_B.")
        x = torch.randn(original[key].shape[1], generator=g)
        want = 2.0 * original[b_key] @ (original[key] @ x)  # alpha 2, rank 1
        torch.testing.assert_close(back[b_key] @ (back[key] @ x), want, rtol=1e-4, atol=1e-4, msg=key)


# ---------------------------------------------------------------- metadata and sources

def job_spec(tmp_path, tiny_model_dir, name="run1"):
    return load_spec(data={"name": name, "model": {"pretrained_model_name_or_path": tiny_model_dir,
                                                   "model_flavour": "dev"},
                           "lora": {"lora_rank": RANK, "lora_alpha": ALPHA, "flux_lora_target": "all+ffs"},
                           "datasets": [{"id": "dogs", "instance_data_dir": str(tmp_path),
                                         "caption_strategy": "instanceprompt", "instance_prompt": "sks dog"}],
                           "output": {"uri": str(tmp_path / "output")}}, check_paths=False)


def header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_metadata_carries_job_facts_not_secrets(tiny_model_dir, tmp_path):
    spec = job_spec(tmp_path, tiny_model_dir)
    t = tiny_transformer(tiny_model_dir)
    src = save_diffusers_lora(tmp_path / "src", train_lora(t, spec.lora), spec.lora)
    extra = {"training_steps": 30, "aws_secret_access_key": "hunter2", "hf_token": "x"}
    kohya = header(export_lora_file(src, "kohya", tmp_path / "k", spec=spec, metadata=extra))
    assert not [k for k, v in kohya.items() if "secret" in k or "token" in k or v in ("hunter2", "x")]
    assert kohya["flux_ray.instance_prompt"] == "sks dog" == kohya["modelspec.trigger_phrase"]
    assert kohya["flux_ray.base_model"] == tiny_model_dir and kohya["flux_ray.model_flavour"] == "dev"
    assert json.loads(kohya["flux_ray.dataset_ids"]) == ["dogs"] and kohya["ss_steps"] == "30"
    assert (kohya["ss_network_dim"], float(kohya["ss_network_alpha"])) == (str(RANK), ALPHA)
    assert "lora_adapter_metadata" not in kohya  # diffusers would read it as the config of converted weights
    diff = header(export_lora_file(src, "diffusers", tmp_path / "d", spec=spec, metadata=extra))
    config = json.loads(diff["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (RANK, ALPHA)
    assert diff["flux_ray.training_steps"] == "30"


def fake_run(tmp_path, tiny_model_dir, t) -> tuple[Path, object]:
    """<output>/<name> as a finished job leaves it: a checkpoint, the driver's LoRA export in every
    format (``export_final_lora``, as at the end of training), run_summary.json, the MLflow spec artifact."""
    from flux_ray.train.driver import export_final_lora

    spec = job_spec(tmp_path, tiny_model_dir)
    spec.output.export_formats = ["diffusers", "kohya", "comfyui"]
    run = Path(spec.run_uri)
    ckpt = run / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    save_file(train_lora(t, spec.lora), str(ckpt / "lora_peft.safetensors"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"position": {"step": 20, "epoch": 1, "batch_index": 0}}))
    export_final_lora(spec, str(ckpt), {"step": 30})
    output = run.parent
    (run / "run_summary.json").write_text(json.dumps({"steps": 30, "mlflow": {
        "tracking_uri": f"sqlite:///{output}/mlflow.db", "run_id": "abc123"}}))
    artifacts = output / "mlartifacts" / "abc123" / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "job_spec.yaml").write_text(json.dumps(spec.model_dump(mode="json")))
    return run, spec


def args(source, fmt="diffusers", out=None, merge=False, spec_path=None):
    return Namespace(source=str(source), format=fmt, out=str(out) if out else None, merge=merge, spec_path=spec_path)


def test_cli_checkpoint_recovers_spec_for_alpha(tiny_model_dir, tmp_path, capsys):
    t = tiny_transformer(tiny_model_dir)
    inputs = fixed_inputs(t)
    base = forward(t, inputs)
    run, _ = fake_run(tmp_path, tiny_model_dir, t)
    ref = forward(t, inputs)
    assert export_cli(args(run / "checkpoint_000002", "diffusers")) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == run / "exports" / "checkpoint_000002" / "diffusers" / "pytorch_lora_weights.safetensors"
    assert header(path)["flux_ray.training_steps"] == "20"
    trained = {n.split(".lora_A.")[0] for n, _ in t.named_parameters() if ".lora_A." in n}
    out = forward(load_with_diffusers(tiny_transformer(tiny_model_dir), path, trained), inputs)
    assert_same_output(out, ref, base)


def test_cli_checkpoint_without_spec_is_an_error(tiny_model_dir, tmp_path):
    t = tiny_transformer(tiny_model_dir)
    lora_spec = preset_spec(t, "mmdit")
    save_file(train_lora(t, lora_spec), str(tmp_path / "lora_peft.safetensors"))
    with pytest.raises(ValueError, match="--spec"):
        export_cli(args(tmp_path, "kohya"))
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(json.dumps(job_spec(tmp_path, tiny_model_dir).model_dump(mode="json")))
    assert export_cli(args(tmp_path, "kohya", out=tmp_path / "x.safetensors", spec_path=str(spec_file))) == 0
    assert load_file(tmp_path / "x.safetensors")["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * ALPHA


def test_driver_export_and_cli_run_dir(tiny_model_dir, tmp_path, capsys):
    from flux_ray.cli import main

    t = tiny_transformer(tiny_model_dir)
    inputs = fixed_inputs(t)
    base = forward(t, inputs)
    run, spec = fake_run(tmp_path, tiny_model_dir, t)
    ref = forward(t, inputs)
    trained = {n.split(".lora_A.")[0] for n, _ in t.named_parameters() if ".lora_A." in n}
    for fmt in ("kohya", "comfyui"):  # written by the driver at the end of training
        path = run / "lora" / fmt / f"run1_{fmt}.safetensors"
        assert header(path)["flux_ray.training_steps"] == "30" and header(path)["flux_ray.base_model"] == tiny_model_dir
    assert read_lora(run / "lora" / "pytorch_lora_weights.safetensors")[0].keys() == trained
    assert main(["export", str(run), "--format", "diffusers"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == run / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"
    out = forward(load_with_diffusers(tiny_transformer(tiny_model_dir), path, trained), inputs)
    assert_same_output(out, ref, base)


def test_cli_run_in_progress_uses_newest_checkpoint(tiny_model_dir, tmp_path, capsys):
    run, _ = fake_run(tmp_path, tiny_model_dir, tiny_transformer(tiny_model_dir))
    (run / "run_summary.json").unlink()
    shutil.rmtree(run / "lora")
    older = run / "checkpoint_000001"
    shutil.copytree(run / "checkpoint_000002", older)
    (older / "trainer_state.json").write_text(json.dumps({"position": {"step": 10, "epoch": 0, "batch_index": 5}}))
    assert export_cli(args(run, "kohya")) == 0  # spec found by the run's name among MLflow artifacts
    path = Path(capsys.readouterr().out.strip())
    assert path == run / "exports" / "checkpoint_000002" / "kohya" / "run1_kohya.safetensors"
    assert header(path)["flux_ray.training_steps"] == "20"


def test_cli_merge(tiny_model_dir, tmp_path, capsys):
    """--merge writes a bf16 diffusers transformer; without a spec the file's flux_ray.base_model is used."""
    from diffusers import FluxTransformer2DModel

    t = tiny_transformer(tiny_model_dir)
    inputs = fixed_inputs(t)
    base = forward(t, inputs)
    run, _ = fake_run(tmp_path, tiny_model_dir, t)
    ref = forward(t, inputs)
    assert export_cli(args(run, merge=True, out=tmp_path / "merged")) == 0
    weights = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    out = forward(FluxTransformer2DModel.from_pretrained(tmp_path / "merged").float(), inputs)
    assert (out - ref).abs().max() < 0.1 * (ref - base).abs().max()  # bf16 weights: close, not exact
    lone = tmp_path / "elsewhere" / "lora.safetensors"
    lone.parent.mkdir()
    shutil.copy(run / "lora" / "pytorch_lora_weights.safetensors", lone)
    assert export_cli(args(lone, merge=True, out=tmp_path / "merged2")) == 0
    weights2 = load_file(next((tmp_path / "merged2").glob("*.safetensors")))
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    with pytest.raises(FileExistsError):
        export_cli(args(lone, merge=True, out=tmp_path / "merged2"))
