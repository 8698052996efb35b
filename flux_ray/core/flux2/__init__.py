"""FLUX.2 ([klein] 4B / 9B and [dev]): the model math a model-family registry delegates to.

Pure torch + diffusers/transformers, no Ray. Each module mirrors a diffusers function and is tested
against it: ``flavours`` (published configs), ``tiny`` (CPU test models), ``text`` (prompt
embeddings), ``latents`` (VAE normalisation, patchify, packing, position ids), ``loss`` (one
flow-matching step), ``lora_targets`` (presets), ``lora_io`` (diffusers LoRA files),
``full_size`` (random full-size weights).
"""
