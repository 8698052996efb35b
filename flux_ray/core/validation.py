"""Validation images from the live (LoRA-wrapped) transformer, written as one grid per step, and their CLIP scores
(``eval.evaluation_type: clip``) returned as metrics."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import re
from pathlib import Path

import torch
from PIL import Image

from flux_ray import storage
from flux_ray.core.clip_score import ClipScorer
from flux_ray.core.trigger_word import apply_trigger_word


def prompt_library(eval_spec, trigger_word: str | None = None) -> dict[str, str]:
    """nickname -> prompt; ``validation_prompt`` is nicknamed 'validation'. ``trigger_word`` (the datasets'
    ``trigger_word``, JobSpec.validation_trigger_word) replaces ``[trigger]`` or goes first in each prompt."""
    prompts = {}
    if eval_spec.validation_prompt:
        prompts["validation"] = eval_spec.validation_prompt
    if eval_spec.user_prompt_library:
        lib = json.loads(Path(eval_spec.user_prompt_library).read_text())
        if not isinstance(lib, dict) or not all(isinstance(v, str) for v in lib.values()):
            raise ValueError(f"eval.user_prompt_library {eval_spec.user_prompt_library!r}: expected a JSON object "
                             "of nickname -> prompt")
        prompts.update(lib)
    return {name: apply_trigger_word(p, trigger_word) for name, p in prompts.items()}


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, img in enumerate(images):
        grid.paste(img, ((k % cols) * w, (k // cols) * h))
    return grid


def _metric_name(name: str) -> str:
    """A prompt nickname as MLflow accepts it in a metric key (letters, digits, ``_-. /:``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_reference_image(uri: str | None, storage_spec=None) -> Image.Image | None:
    """eval.validation_reference_image as RGB (local path or s3://), or None."""
    if not uri:
        return None
    return Image.open(io.BytesIO(storage.read_bytes(uri, storage_spec))).convert("RGB")


def reference_kwargs(reference: Image.Image | None, width: int, height: int) -> dict:
    """FluxKontextPipeline's reference arguments at one validation size: the reference resized to that size (as
    reference_strict trains), no snapping to Kontext's preferred resolutions (``_auto_resize=False``), and the
    output kept at that size (``max_area``: the pipeline otherwise rescales every output to 1024² pixels)."""
    if reference is None:
        return {}
    return {"image": reference.resize((width, height), Image.Resampling.LANCZOS), "_auto_resize": False,
            "max_area": width * height}


class Validator:
    """Renders the prompt library at each validation size with the training transformer, through the family's
    pipeline (FLUX.1: FluxPipeline, Kontext's editing ``eval.validation_reference_image``; FLUX.2:
    Flux2KleinPipeline / Flux2Pipeline).

    Memory: nothing is loaded until the first validation. Then the VAE is loaded and every prompt (and the CFG
    negative prompt) is encoded once by the family's text encoders (FLUX.1: CLIP + T5; FLUX.2: Qwen3 or Mistral 3)
    on the training device; only the embeddings are kept (on the CPU)
    and the text encoders are freed, so later steps never share the GPU with them (T5-XXL in bf16: ~9.5 GB). The VAE
    (~160 MB in bf16) stays on the CPU between validations and visits the device while images render, as the CLIP
    scorer does."""

    def __init__(self, spec, transformer, device: torch.device, write: bool = True, family=None):
        """``family`` (flux_ray.families) builds the pipeline; default: the spec's ``model.model_family``."""
        if family is None:  # the registry sits on core's floor; imported here so core's modules load without it
            from flux_ray.families import get_family

            family = get_family(spec.model.model_family)
        self.spec, self.transformer, self.device, self.write, self.family = spec, transformer, device, write, family
        self.prompts = prompt_library(spec.eval, spec.validation_trigger_word)
        self.reference = load_reference_image(spec.eval.validation_reference_image, spec.storage)
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.guidance, self.negative_prompt = family.validation_guidance(spec.model, spec.eval)
        self.pipe = None  # built at the first validation, without text encoders
        self.embeds: dict[str, dict[str, torch.Tensor]] = {}  # prompt -> the pipeline's embedding arguments, CPU
        self.scorer = None
        if write and spec.eval.evaluation_type == "clip":  # loaded at the first validation, on this rank only
            self.scorer = ClipScorer(spec.eval.pretrained_evaluation_model_name_or_path, device)

    def _build(self) -> None:
        """The pipeline (VAE on the CPU) and the prompt embeddings, encoded once by text encoders that are freed
        (the negative prompt too: FLUX.1's true CFG, FLUX.2 [klein]'s CFG)."""
        model = self.spec.model
        pipe = self.family.validation_pipeline(model, self.transformer, self.dtype, self.device)
        pipe.vae.to("cpu")  # moved to the device only while images render
        pipe.set_progress_bar_config(disable=True)
        texts = [*self.prompts.values(), *([self.negative_prompt] if self.negative_prompt is not None else [])]
        with torch.no_grad():
            for text in dict.fromkeys(texts):
                embeds = self.family.encode_validation_prompt(pipe, text, self.device, model.t5_max_length)
                self.embeds[text] = {k: v.cpu() for k, v in embeds.items()}
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if name in pipe.components:
                setattr(pipe, name, None)
        self.pipe = pipe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the encoders' memory back, not only to the caching allocator

    def _embeds(self, text: str, negative: bool = False) -> dict:
        prefix = "negative_" if negative else ""
        return {f"{prefix}{k}": v.to(self.device) for k, v in self.embeds[text].items()}

    @torch.no_grad()
    def render(self) -> list[tuple[str, Image.Image]]:
        if self.pipe is None:
            self._build()
        ev, out = self.spec.eval, []
        self.pipe.vae.to(self.device)
        try:
            for name, prompt in self.prompts.items():
                for w, h in ev.validation_sizes:
                    kwargs = {**reference_kwargs(self.reference, w, h), **self.guidance, **self._embeds(prompt)}
                    if self.negative_prompt is not None:
                        kwargs.update(self._embeds(self.negative_prompt, negative=True))
                    img = self.pipe(width=w, height=h, num_inference_steps=ev.validation_num_inference_steps,
                                    max_sequence_length=self.spec.model.t5_max_length,
                                    generator=torch.Generator().manual_seed(ev.validation_seed), **kwargs).images[0]
                    out.append((f"{name}-{w}x{h}", img))
        finally:
            self.pipe.vae.to("cpu")  # off the training device until the next validation
        return out

    def render_for_step(self) -> list[tuple[str, Image.Image]]:
        """``render`` from inside training: the transformer in eval mode, then back. CUDA-graph blocks
        (train.dynamo_mode reduce-overhead) would record a graph per pipeline shape and hold its memory pool,
        so the pipeline runs them eagerly."""
        was_training = self.transformer.training
        self.transformer.eval()
        stance = (torch.compiler.set_stance("force_eager") if self.spec.train.uses_cuda_graphs
                  else contextlib.nullcontext())
        try:
            with stance:
                return self.render()
        finally:
            self.transformer.train(was_training)

    def image_prompts(self) -> list[str]:
        """The prompt of each image ``render`` returns, in its order."""
        return [p for p in self.prompts.values() for _ in self.spec.eval.validation_sizes]

    def clip_scores(self, images: list[tuple[str, Image.Image]]) -> dict[str, float]:
        """``clip_score`` (mean) and ``clip_score/<nickname>-WxH`` of rendered images."""
        scores = self.scorer([img for _, img in images], self.image_prompts())
        out = {f"clip_score/{_metric_name(name)}": s for (name, _), s in zip(images, scores)}
        return {"clip_score": sum(scores) / len(scores), **out}

    def __call__(self, step: int) -> dict:
        """Write step-N/<nickname>-WxH.png and step-N.png (grid) under the run's validation folder."""
        images = self.render_for_step()
        if not self.write:
            return {}
        base = storage.join(self.spec.run_uri, "validation")
        for name, img in images:
            storage.write_bytes_atomic(storage.join(base, f"step-{step:06d}", f"{name}.png"), _png(img), self.spec.storage)
        grid_uri = storage.join(base, f"step-{step:06d}.png")
        storage.write_bytes_atomic(grid_uri, _png(make_grid([i for _, i in images])), self.spec.storage)
        out = {"validation_grid": grid_uri}
        if self.scorer is not None:
            scores = self.clip_scores(images)
            out["validation_clip_scores"] = storage.join(base, f"step-{step:06d}.clip_score.json")
            storage.write_json_atomic(out["validation_clip_scores"], scores, self.spec.storage)
            out.update(scores)
        return out
