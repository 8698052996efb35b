"""flux_ray: distributed Flux.1 LoRA fine-tuning on Ray."""
__version__ = "0.1.0"
