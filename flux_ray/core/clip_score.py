"""CLIP score of generated images against their prompts (``eval.evaluation_type: clip``).

The definition is torchmetrics' ``CLIPScore`` (and so SimpleTuner's ``CLIPModelEvaluator``):
``100 * max(cos(E_image, E_text), 0)`` with the CLIP model's projected embeddings, prompts truncated to the
text tower's length. Computed here with transformers' ``CLIPModel`` + ``CLIPProcessor`` (no torchmetrics).

Memory: the model is loaded on the first call and kept on the CPU between validations; it visits the
training device only while it scores (ViT-L/14-336 in bf16: ~0.9 GB), so training steps never share the GPU
with it.
"""
from __future__ import annotations

import torch
from PIL import Image

SCORE_BATCH = 8
"""Images scored per forward: bounds the vision tower's activations on the training GPU."""


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Row-wise ``100 * max(cos(image_emb, text_emb), 0)`` (torchmetrics' CLIPScore per sample)."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return (100 * cos).clamp(min=0)


class ClipScorer:
    """``scorer(images, prompts) -> [score per image]`` with one CLIP model, loaded once."""

    def __init__(self, model_name_or_path: str, device: torch.device, dtype: torch.dtype | None = None):
        self.path, self.device = model_name_or_path, device
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self._model = self._processor = None

    def _load(self) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self._processor = CLIPProcessor.from_pretrained(self.path)
            self._model = CLIPModel.from_pretrained(self.path, dtype=self.dtype).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ValueError(f"eval.pretrained_evaluation_model_name_or_path {self.path!r}: cannot load a CLIP "
                             f"model and processor ({e})") from e

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if self._model is None:
            self._load()
        model = self._model.to(self.device)
        try:
            scores = [self._score(model, images[i:i + SCORE_BATCH], prompts[i:i + SCORE_BATCH])
                      for i in range(0, len(images), SCORE_BATCH)]
        finally:
            self._model = model.to("cpu")  # off the training device until the next validation
        return [float(s) for chunk in scores for s in chunk]

    def _score(self, model, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        max_len = model.config.text_config.max_position_embeddings
        inputs = self._processor(text=prompts, images=[i.convert("RGB") for i in images], return_tensors="pt",
                                 padding=True, truncation=True, max_length=max_len)
        out = model(input_ids=inputs["input_ids"].to(self.device),
                    attention_mask=inputs["attention_mask"].to(self.device),
                    pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        return clip_score_from_embeddings(out.image_embeds, out.text_embeds).cpu()
