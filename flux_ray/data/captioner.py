"""Ray-free callables of the auto-caption stage (data/auto_captions.py runs them on Ray Data).

``load_for_caption``: a CPU task reads and decodes one image (torch-free). ``Captioner``: an actor holding a
vision-language model (``captioner.model_name``: Florence-2, BLIP, GIT, Qwen2-VL ... anything
``AutoModelForImageTextToText`` loads) that maps a batch of images to captions.
"""
from __future__ import annotations

import numpy as np

MAX_CAPTION_SIDE = 1024
"""Images are shrunk to this longest side before they travel to the captioner (its processor resizes to
384-768 px anyway): a 24 MP photo would otherwise move 72 MB through the object store."""


def load_for_caption(row: dict, dataset_spec, storage_spec=None) -> dict:
    """Read + decode one image (EXIF-rotated RGB, at most MAX_CAPTION_SIDE); ``error`` names what failed."""
    from PIL import Image

    from flux_ray.data import sources
    from flux_ray.data.decode import SkipImage, decode_image

    out = dict(row, pixels=np.zeros(0, np.uint8), width=0, height=0, error="")
    try:
        ref = sources.ImageRef(**{k: row[k] for k in ("dataset_id", "uri", "rel_path", "size", "mtime_ns")})
        img = decode_image(sources.read_bytes(ref, dataset_spec, storage_spec), row["rel_path"])
    except SkipImage as e:
        out["error"] = e.reason
        return out
    except OSError as e:
        out["error"] = f"read_error:{type(e).__name__}"
        return out
    img.thumbnail((MAX_CAPTION_SIDE, MAX_CAPTION_SIDE), Image.Resampling.LANCZOS)
    out.update(pixels=np.asarray(img, dtype=np.uint8).ravel(), width=img.width, height=img.height)
    return out


class Captioner:
    """Loads ``captioner_spec.model_name`` with AutoProcessor / AutoModelForImageTextToText and captions
    batches of ``load_for_caption`` rows: ``{rel_path, caption}`` out ("" for an image that failed to load)."""

    def __init__(self, captioner_spec, use_gpu: bool = False):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from flux_ray.core.model import DTYPES
        from flux_ray.data.encoders import pick_device

        self.spec, self.device = captioner_spec, pick_device(use_gpu)
        self.dtype = DTYPES[captioner_spec.precision] if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(captioner_spec.model_name)
        self.model = AutoModelForImageTextToText.from_pretrained(captioner_spec.model_name, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.prompt = self._prompt(captioner_spec.query_str)

    def _prompt(self, query: str) -> str | None:
        """The text given with each image: a chat model gets the query in its chat template with the image."""
        if not query:
            return None
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return query

    def caption(self, images: list) -> list[str]:
        """Captions of PIL images, greedy decoding, whitespace collapsed."""
        import torch

        kwargs = {"images": images, "return_tensors": "pt"}
        if self.prompt is not None:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in self.processor(**kwargs).items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, do_sample=False)
        if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1]:]  # decoder-only models echo the prompt
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        n = len(batch["rel_path"])
        captions = [""] * n
        ok = [i for i in range(n) if not batch["error"][i]]
        step = self.spec.batch_size
        for chunk in (ok[k:k + step] for k in range(0, len(ok), step)):
            images = [Image.fromarray(np.asarray(batch["pixels"][i], dtype=np.uint8)
                                      .reshape(int(batch["height"][i]), int(batch["width"][i]), 3)) for i in chunk]
            for i, text in zip(chunk, self.caption(images)):
                captions[i] = text
        return {"rel_path": np.asarray(batch["rel_path"], dtype=object), "caption": np.array(captions, dtype=object),
                "error": np.asarray(batch["error"], dtype=object)}
