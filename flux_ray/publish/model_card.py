"""The model card (README.md) of a published LoRA: Hub metadata, trigger word, settings, metrics, validation."""
from __future__ import annotations

import yaml

FLAVOUR_NAMES = {"dev": "FLUX.1 [dev]", "krea": "FLUX.1 Krea [dev]", "schnell": "FLUX.1 [schnell]",
                 "kontext": "FLUX.1 Kontext [dev]"}


def trigger_word(spec) -> str | None:
    """The image datasets' trigger words (``datasets[].trigger_word``, comma-joined when several), else the first
    instance prompt (``caption_strategy: instanceprompt`` trains on it alone)."""
    if spec.trigger_words:
        return ", ".join(spec.trigger_words)
    return next((d.instance_prompt for d in spec.enabled_datasets("image") if d.instance_prompt), None)


def settings(spec) -> dict:
    tr, lora = spec.train, spec.lora
    out = {"lora_type": lora.lora_type, "lora_rank": lora.lora_rank, "lora_alpha": lora.alpha,
           "flux_lora_target": lora.flux_lora_target, "learning_rate": tr.learning_rate, "optimizer": tr.optimizer,
           "lr_scheduler": tr.lr_scheduler, "max_train_steps": tr.max_train_steps,
           "train_batch_size": tr.train_batch_size, "gradient_accumulation_steps": tr.gradient_accumulation_steps,
           "num_workers": spec.scaling.num_workers, "mixed_precision": tr.mixed_precision,
           "base_model_precision": spec.model.base_model_precision, "seed": tr.seed,
           "resolution": sorted({d.resolution for d in spec.enabled_datasets("image")})}
    return out


def render(spec, summary: dict, lora_files: list[str], validation_files: list[str]) -> str:
    """README.md text; ``lora_files`` and ``validation_files`` are paths relative to the card."""
    word = trigger_word(spec)
    meta = {"base_model": spec.model.base_path, "library_name": "diffusers", "license": "other",
            "tags": ["text-to-image", "flux", "lora", "diffusers", "template:sd-lora", "flux_ray"]}
    if word:
        meta["instance_prompt"] = word
    flavour = FLAVOUR_NAMES.get(spec.model.model_flavour, spec.model.model_flavour)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {spec.name}", "",
             f"A LoRA for {flavour} (`{spec.model.base_path}`), trained with flux_ray.", ""]
    if word:
        lines += ["## Trigger word", "", f"Put `{word}` in the prompt.", ""]
    lines += ["## Files", "", "| file | format |", "| --- | --- |"]
    lines += [f"| `{f}` | {f.split('/')[0] if '/' in f else 'diffusers'} |" for f in lora_files]
    lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in settings(spec).items()]
    metrics = {"steps": summary.get("steps"), "final train loss": summary.get("final_loss"),
               "eval loss": summary.get("eval_loss"), "training time (s)": summary.get("seconds")}
    lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
              if v is not None]
    if validation_files:
        from flux_ray.core.validation import prompt_library

        try:
            prompts = prompt_library(spec.eval, spec.validation_trigger_word)  # as rendered: trigger word applied
        except (OSError, ValueError):  # a library the driver cannot read (s3://): the card goes without it
            prompts = {}
        lines += ["", "## Validation", ""] + [f"- {nick}: `{p}`" for nick, p in prompts.items()] + [""]
        lines += [f"![{f.rsplit('/', 1)[-1]}]({f})" for f in validation_files]
    main = next((f for f in lora_files if "/" not in f), None)
    if main:
        lines += ["", "## Use with diffusers", "", "```python", "import torch",
                  "from diffusers import FluxPipeline", "",
                  f"pipe = FluxPipeline.from_pretrained({spec.model.base_path!r}, torch_dtype=torch.bfloat16)",
                  f"pipe.load_lora_weights(\"<this repo or folder>\", weight_name={main!r})",
                  f"image = pipe({(word or 'a photo') !r}).images[0]", "```"]
    return "\n".join(lines) + "\n"
