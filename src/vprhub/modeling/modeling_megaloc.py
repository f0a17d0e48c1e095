"""MegaLoc as a transformers model: the SALAD model with every block trained and a learned projection."""

from __future__ import annotations

from .configuration_megaloc import MegaLocConfig
from .modeling_salad import SaladModel


class MegaLocModel(SaladModel):
    """DINOv2 backbone (every block trained), SALAD aggregation, linear projection, L2 normalisation.

    The forward returns a ``SaladOutput`` whose ``descriptors`` are the projected descriptors and whose
    ``aggregation`` is the SALAD aggregation before the projection.
    """

    config: MegaLocConfig
    config_class = MegaLocConfig
    base_model_prefix = "megaloc"


__all__ = ["MegaLocModel"]
