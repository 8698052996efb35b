"""Delivering a finished run: LoRA files, a model card and the validation grid to storage and/or the Hub."""
