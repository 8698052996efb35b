"""CLIP score (eval.evaluation_type: clip): torchmetrics' definition on transformers' CLIPModel, and where the
spec refuses it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flux_ray.core.clip_score import ClipScorer, clip_score_from_embeddings
from flux_ray.spec import SpecError

PROMPTS = ["a blue square", "a green triangle", "a red circle", "xxxxxxxxxxxx"]


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


def _direct(path: str, image: Image.Image, prompt: str) -> float:
    """100 * max(cos, 0) of CLIPModel's projected image and text features, computed here without ClipScorer."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = proc(text=[prompt], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))  # transformers 5 returns the output object
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)
    return max(100 * float(cos), 0.0)


def test_score_is_clip_models_cosine_and_tells_prompts_apart(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir, torch.device("cpu"))
    image = _image()
    scores = scorer([image] * len(PROMPTS), PROMPTS)
    for prompt, score in zip(PROMPTS, scores):
        assert score == pytest.approx(_direct(tiny_clip_dir, image, prompt), abs=1e-4), prompt
    positive = sorted({round(s, 3) for s in scores if s > 0})
    assert len(positive) >= 2, scores  # two prompts, two different scores for the same image
    assert scorer([image], [PROMPTS[0]]) == pytest.approx(scores[:1], abs=1e-4)  # batching changes nothing
    assert scorer([_image(1)], [PROMPTS[0]]) != pytest.approx(scores[:1], abs=1e-3)  # another image, another score


def test_negative_cosines_score_zero():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[-1.0, 0.2], [2.0, 2.0]])
    assert clip_score_from_embeddings(a, b).tolist() == pytest.approx([0.0, 100.0])


def test_a_missing_clip_model_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="eval.pretrained_evaluation_model_name_or_path"):
        ClipScorer(str(tmp_path / "nothing"), torch.device("cpu"))([_image()], ["a cat"])


def test_evaluation_options_are_refused_where_they_would_not_act(demo_spec, tiny_model_dir, demo_data_dir, tmp_path,
                                                                 tiny_clip_dir):
    clip = {"evaluation_type": "clip", "pretrained_evaluation_model_name_or_path": tiny_clip_dir}
    spec = demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval=clip)  # demo.yaml renders validation images
    assert spec.eval.evaluation_type == "clip"
    with pytest.raises(SpecError, match="evaluation_type clip scores validation images"):
        demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={**clip, "validation_step_interval": None})
    with pytest.raises(SpecError, match="evaluation_type clip scores validation images"):
        demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={**clip, "validation_prompt": None})
    with pytest.raises(SpecError, match="pretrained_evaluation_model_name_or_path is read only with"):
        demo_spec(tiny_model_dir, demo_data_dir, tmp_path, eval={"pretrained_evaluation_model_name_or_path": "x"})
