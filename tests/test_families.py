"""The model-family registry: the spec picks a family, FLUX.1 implements the whole interface by delegating to
core, its text embedding is diffusers' own, and shared code never branches on a family's name."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import flux_ray
from flux_ray.core import flow
from flux_ray.families import FAMILIES, get_family
from flux_ray.families.base import ModelFamily
from flux_ray.families.flux1 import Flux1
from flux_ray.spec import JobSpec, ModelSpec, SpecError, load_spec

PACKAGE = Path(flux_ray.__file__).parent


def test_model_family_picks_the_family(tmp_path):
    """model.model_family selects the registry entry; an unknown family is refused by the spec (file, key)
    and by the registry (known names listed)."""
    spec = JobSpec.model_validate({"datasets": [{"id": "a", "instance_data_dir": str(tmp_path)}]})
    assert spec.model.model_family == "flux"
    assert isinstance(get_family(spec.model.model_family), Flux1)
    bad = tmp_path / "job.yaml"
    bad.write_text(f"model: {{model_family: sdxl}}\ndatasets: [{{id: a, instance_data_dir: {tmp_path}}}]\n")
    with pytest.raises(SpecError, match=r"model\.model_family"):
        load_spec(bad, check_paths=False)
    with pytest.raises(ValueError, match=r"known families are \['flux', 'flux2'\]"):
        get_family("sdxl")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_implements_the_interface(name):
    family = get_family(name)
    members = [m for m in dir(ModelFamily) if not m.startswith("_")] + list(ModelFamily.__annotations__)
    missing = [m for m in members if not hasattr(family, m)]
    assert not missing, f"{name} lacks {missing}"
    for m in (m for m in members if callable(getattr(ModelFamily, m, None))):
        ours, proto = inspect.signature(getattr(family, m)), inspect.signature(getattr(ModelFamily, m))
        assert list(ours.parameters) == list(proto.parameters)[1:], f"{name}.{m}{ours} vs {proto}"
    assert family.name == name


def test_flux1_embeds_text_as_the_flux_pipeline_does(tiny_model_dir):
    """FLUX.1's embed_text (what the text cache stores) equals diffusers' FluxPipeline.encode_prompt."""
    from diffusers import FluxPipeline

    family, model_spec = get_family("flux"), ModelSpec(pretrained_model_name_or_path=tiny_model_dir)
    encoders = family.load_text_encoders(model_spec)
    captions = ["a red cube", "two cats on a very long sofa under a window"]
    out = family.embed_text(encoders, captions, 16, torch.device("cpu"))
    assert tuple(out) == family.text_blobs
    tok, clip, tok2, t5 = encoders
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=None)
    embeds, pooled, _ = pipe.encode_prompt(captions, captions, device="cpu", max_sequence_length=16)
    torch.testing.assert_close(out["prompt_embeds"], embeds)
    torch.testing.assert_close(out["pooled"], pooled)
    assert out["text_mask"].dtype == torch.int8 and out["text_mask"].sum(1).tolist()[0] < 16  # short caption: padded


def test_flux1_latents_and_presets_are_core_and_spec_ones():
    family = get_family("flux")
    raw = torch.randn(2, 16, 4, 6)
    cfg = {"shift_factor": 0.1159, "scaling_factor": 0.3611}
    torch.testing.assert_close(family.normalize_latents(raw, cfg), flow.normalize_latents(raw, 0.1159, 0.3611))
    torch.testing.assert_close(family.pack_latents(raw), flow.pack_latents(raw))
    from flux_ray.spec import LORA_TARGET_PRESETS, LoraSpec

    assert family.lora_target_presets is LORA_TARGET_PRESETS
    assert family.lora_targets(LoraSpec(flux_lora_target="mmdit")) == LORA_TARGET_PRESETS["mmdit"]


def test_no_family_branches_outside_the_registry():
    """No ``model_family == ...`` (or ``!=``, ``in``) comparisons outside flux_ray/families/."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(n, ast.Attribute) and n.attr == "model_family" for n in [node.left, *node.comparators]):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"branch through get_family instead: {found}"


@pytest.fixture(scope="module")
def tiny_klein(tmp_path_factory):
    """A klein-4b ModelSpec whose tiny model make_tiny_if_missing writes through the family."""
    spec = ModelSpec(model_family="flux2", model_flavour="klein-4b", make_tiny_if_missing=True,
                     pretrained_model_name_or_path=str(tmp_path_factory.mktemp("f2") / "tiny-klein"))
    get_family("flux2").ensure_base(spec)
    return spec


def test_flux2_family_matches_the_klein_pipeline(tiny_klein):
    """FLUX.2's embed_text is Flux2KleinPipeline.encode_prompt's embedding (no pooled column), its latent
    normalisation from the cached VAE latents equals core/flux2's encode_images, and it exports diffusers only."""
    from diffusers import Flux2KleinPipeline

    from flux_ray.core.flux2 import latents as L

    family = get_family("flux2")
    encoders = family.load_text_encoders(tiny_klein)
    captions = ["a red cube", "two cats on a sofa"]
    out = family.embed_text(encoders, captions, 24, torch.device("cpu"))
    assert tuple(out) == family.text_blobs and "pooled" not in out
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein.base_path)
    embeds, _ = pipe.encode_prompt(captions, device="cpu", max_sequence_length=24)
    torch.testing.assert_close(out["prompt_embeds"], embeds)
    vae, cfg = family.load_vae(tiny_klein), family.load_vae_config(tiny_klein)
    px = torch.rand(1, 3, 64, 64) * 2 - 1
    raw = vae.encode(px).latent_dist.mode()
    torch.testing.assert_close(family.normalize_latents(raw, family.latent_norm(cfg)), L.encode_images(vae, px))
    torch.testing.assert_close(family.normalize_latents(raw[0], cfg), L.encode_images(vae, px)[0])
    img_ids, txt_ids = family.position_ids(2, 3, 5, "cpu")
    assert img_ids.shape == (6, 4) and txt_ids.shape == (5, 4) and family.transformer_inputs(None) == {}
    with pytest.raises(ValueError, match="exports diffusers only.*comfy/lora.py model_lora_keys_unet"):
        family.export_lora_file("x.safetensors", "kohya", "out")


def test_flux2_validation_guidance_per_flavour():
    """[klein]: validation_guidance is the CFG scale, with the negative prompt above 1; [dev]: distilled guidance,
    never a negative prompt."""
    from flux_ray.spec import EvalSpec

    family, ev = get_family("flux2"), EvalSpec(validation_guidance=4.0, validation_negative_prompt="blurry")
    klein = ModelSpec(model_family="flux2", model_flavour="klein-9b")
    assert family.validation_guidance(klein, ev) == ({"guidance_scale": 4.0}, "blurry")
    assert family.validation_guidance(klein, EvalSpec(validation_guidance=1.0)) == ({"guidance_scale": 1.0}, None)
    assert family.validation_guidance(ModelSpec(model_family="flux2", model_flavour="dev"), ev) == (
        {"guidance_scale": 4.0}, None)
    assert get_family("flux").validation_guidance(ModelSpec(), ev) == ({"guidance_scale": 4.0}, None)
