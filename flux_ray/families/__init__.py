"""The model-family registry: ``get_family(spec.model.model_family)`` -> the family's interface (base.py).

A new family is a module here (its class implementing :class:`~flux_ray.families.base.ModelFamily`), one
entry in ``FAMILIES``, the spec's ``model.model_family`` Literal widened, and its tests.
"""
from __future__ import annotations

from flux_ray.families.base import ModelFamily
from flux_ray.families.flux1 import Flux1
from flux_ray.families.flux2 import Flux2

DEFAULT_FAMILY = "flux"
"""The spec's default ``model.model_family``: FLUX.1."""
FAMILIES: dict[str, ModelFamily] = {"flux": Flux1(), "flux2": Flux2()}
"""model.model_family value -> its family (SimpleTuner's names)."""


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.model_family {name!r}: known families are {sorted(FAMILIES)}") from None
