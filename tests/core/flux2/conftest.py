"""Tiny FLUX.2 models, written once per session in diffusers layout (one per text-encoder kind)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_flux2_dirs(tmp_path_factory) -> dict[str, str]:
    from flux_ray.core.flux2.tiny import write_tiny_flux2

    root = tmp_path_factory.mktemp("flux2-models")
    return {fl: str(write_tiny_flux2(root / f"tiny-flux2-{fl}", fl)) for fl in ("klein-4b", "dev")}


@pytest.fixture(scope="session")
def tiny_flux2_pipes(tiny_flux2_dirs):
    """{flavour: pipeline loaded through from_pretrained}; tests must not modify them."""
    from flux_ray.core.flux2.flavours import pipeline_class

    pipes = {fl: pipeline_class(fl).from_pretrained(d) for fl, d in tiny_flux2_dirs.items()}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes
