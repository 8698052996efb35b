"""Validation images: prompt library nicknames name the files, a grid per step, true CFG changes the image; the
prompts are encoded once at the first validation and the text encoders freed, with the same images."""
from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ray.core import model as M
from flux_ray.core.validation import Validator, make_grid, prompt_library


def _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, **ev):
    lib = tmp_path / "prompts.json"
    lib.write_text(json.dumps({"cat": "a red circle", "dog": "a blue square"}))
    base = {"validation_step_interval": 1, "validation_prompt": "a green triangle", "user_prompt_library": str(lib),
            "validation_resolution": "64x64,128x64", "validation_num_inference_steps": 2}
    return demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={**base, **ev})


def test_prompt_library_and_grid(demo_spec, tiny_model_dir, demo_data_dir, tmp_path):
    spec = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path)
    assert prompt_library(spec.eval) == {"validation": "a green triangle", "cat": "a red circle",
                                         "dog": "a blue square"}
    tr = M.load_transformer(spec.model, torch.float32)
    out = Validator(spec, tr, torch.device("cpu"))(7)
    step_dir = tmp_path / "output" / "demo" / "validation" / "step-000007"
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == sorted(f"{n}-{s}.png" for n in ("validation", "cat", "dog") for s in ("64x64", "128x64"))
    assert Image.open(step_dir / "cat-128x64.png").size == (128, 64)
    grid = Image.open(out["validation_grid"])
    assert grid.size == (3 * 128, 2 * 64)  # 6 images in a 3x2 grid of the largest size


def test_true_cfg_uses_the_negative_prompt(demo_spec, tiny_model_dir, demo_data_dir, tmp_path):
    plain = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, user_prompt_library=None,
                  validation_resolution="64x64")
    cfg = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, user_prompt_library=None,
                validation_resolution="64x64", validation_guidance_real=4.0, validation_negative_prompt="blurry")
    tr = M.load_transformer(plain.model, torch.float32)
    a = np.asarray(Validator(plain, tr, torch.device("cpu")).render()[0][1], dtype=np.float32)
    b = np.asarray(Validator(cfg, tr, torch.device("cpu")).render()[0][1], dtype=np.float32)
    assert np.abs(a - b).max() > 1.0


def test_make_grid_layout():
    imgs = [Image.new("RGB", (10, 20), c) for c in ("red", "green", "blue", "white", "black")]
    assert make_grid(imgs).size == (30, 40)


def test_trigger_word_goes_into_the_validation_prompts(demo_spec, tiny_model_dir, demo_data_dir, tmp_path):
    lib = tmp_path / "trigger.json"
    lib.write_text(json.dumps({"cat": "a photo of [trigger] as a cat", "plain": "ohwx on a beach"}))
    ds = {"id": "demo", "instance_data_dir": demo_data_dir, "caption_strategy": "textfile", "resolution": 128,
          "trigger_word": "ohwx"}
    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path, datasets=[ds],
                     eval={"validation_prompt": "a red circle", "user_prompt_library": str(lib)})
    validator = Validator(spec, M.load_transformer(spec.model, torch.float32), torch.device("cpu"), write=False)
    assert validator.prompts == {"validation": "ohwx, a red circle", "cat": "a photo of ohwx as a cat",
                                 "plain": "ohwx on a beach"}
    two = demo_spec(tiny_model_dir, demo_data_dir, tmp_path,
                    datasets=[ds, {**ds, "id": "other", "trigger_word": "zkz"}], eval={"validation_prompt": "a dog"})
    assert two.validation_trigger_word is None and prompt_library(two.eval, two.validation_trigger_word) == \
        {"validation": "a dog"}  # two concepts: the prompts name the one they want


def test_cuda_graph_blocks_render_eagerly(demo_spec, tiny_model_dir, demo_data_dir, tmp_path):
    """train.dynamo_mode reduce-overhead: the pipeline must not record graphs of its own shapes, so validation
    runs the compiled blocks eagerly; in the default mode it runs them compiled."""
    from flux_ray.core.compile import compile_blocks

    spec = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, user_prompt_library=None,
                 validation_resolution="64x64")
    tr = M.load_transformer(spec.model, torch.float32)
    compiled = []

    def backend(gm, inputs):
        compiled.append(gm)
        return gm.forward

    compile_blocks(tr, backend=backend)
    graphs = spec.model_copy(deep=True)  # the spec a one-GPU reduce-overhead run carries (validated on its own)
    graphs.train.compile, graphs.train.dynamo_mode, graphs.scaling.use_gpu = True, "reduce-overhead", True
    assert graphs.train.uses_cuda_graphs
    eager = Validator(graphs, tr, torch.device("cpu"), write=False).render_for_step()
    assert not compiled
    normal = Validator(spec, tr, torch.device("cpu"), write=False).render_for_step()
    assert compiled
    assert np.abs(np.asarray(eager[0][1], np.float32) - np.asarray(normal[0][1], np.float32)).max() <= 1.0


def test_clip_scores_of_the_validation_images(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, tiny_clip_dir):
    from flux_ray.core.clip_score import ClipScorer

    spec = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, validation_resolution="64x64",
                 evaluation_type="clip", pretrained_evaluation_model_name_or_path=tiny_clip_dir)
    validator = Validator(spec, M.load_transformer(spec.model, torch.float32), torch.device("cpu"))
    assert validator.scorer._model is None  # loaded at the first validation, not at build time
    out = validator(3)
    names = ("validation-64x64", "cat-64x64", "dog-64x64")
    assert set(out) == {"validation_grid", "validation_clip_scores", "clip_score", *(f"clip_score/{n}" for n in names)}
    step_dir = tmp_path / "output" / "demo" / "validation" / "step-000003"
    direct = ClipScorer(tiny_clip_dir, torch.device("cpu"))(
        [Image.open(step_dir / f"{n}.png") for n in names], ["a green triangle", "a red circle", "a blue square"])
    assert [out[f"clip_score/{n}"] for n in names] == pytest.approx(direct, abs=1e-4)  # each image vs its prompt
    assert out["clip_score"] == pytest.approx(sum(direct) / 3)
    assert max(direct) > 0  # the random tiny CLIP still scores some image above the clamp
    assert json.loads(open(out["validation_clip_scores"]).read()) == pytest.approx(
        {k: v for k, v in out.items() if k.startswith("clip_score")})
    assert Validator(spec, validator.pipe.transformer, torch.device("cpu"), write=False)(4) == {}  # other ranks


def _live(cls) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


@pytest.mark.parametrize("ev", [{}, {"validation_guidance_real": 4.0, "validation_negative_prompt": "blurry",
                                    "user_prompt_library": None, "validation_resolution": "64x64"}],
                         ids=["library", "true-cfg"])
def test_validation_renders_from_cached_embeddings_as_with_the_encoders(
        demo_spec, tiny_model_dir, demo_data_dir, tmp_path, images_rendered_with_encoders, ev):
    """Nothing loaded before the first validation; after it, the text encoders are gone (no T5 or CLIP text model
    alive, none in the pipeline) and only the embeddings of each prompt (and the negative one) are kept; the images
    equal those of a pipeline that holds the encoders and is given the prompt texts, at that and later validations."""
    from transformers import CLIPTextModel, T5EncoderModel

    spec = _spec(demo_spec, tiny_model_dir, demo_data_dir, tmp_path, **ev)
    tr = M.load_transformer(spec.model, torch.float32)
    expected = images_rendered_with_encoders(spec, tr)
    held = M.load_text_encoders(spec.model)  # noqa: F841 (alive: shows that the count sees a live encoder)
    t5s, clips = _live(T5EncoderModel), _live(CLIPTextModel)
    assert t5s >= 1 and clips >= 1
    validator = Validator(spec, tr, torch.device("cpu"), write=False)
    assert validator.pipe is None and not validator.embeds  # lazy
    first = validator.render_for_step()
    assert [n for n, _ in first] == [f"{n}-{w}x{h}" for n in validator.prompts for w, h in spec.eval.validation_sizes]
    for (_, img), want in zip(first, expected, strict=True):
        assert np.array_equal(np.asarray(img), want)
    comps = validator.pipe.components
    assert comps["text_encoder"] is None and comps["text_encoder_2"] is None and comps["tokenizer_2"] is None
    assert _live(T5EncoderModel) == t5s and _live(CLIPTextModel) == clips  # the validator's encoders were freed
    prompts = {*validator.prompts.values(), *([ev["validation_negative_prompt"]] if ev else [])}
    assert set(validator.embeds) == prompts
    assert all(set(d) == {"prompt_embeds", "pooled_prompt_embeds"} for d in validator.embeds.values())
    assert all(d["prompt_embeds"].device.type == "cpu" and d["prompt_embeds"].shape[1] == spec.model.t5_max_length
               and d["pooled_prompt_embeds"].ndim == 2 for d in validator.embeds.values())
    again = validator.render_for_step()  # a later validation: the same images from the same embeddings
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(first, again, strict=True))
