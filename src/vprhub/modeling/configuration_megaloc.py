"""Configuration of MegaLoc (Berton & Masone, CVPRW 2025): SALAD aggregation plus a linear projection."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_salad import SaladConfig


@strict
class MegaLocConfig(SaladConfig):
    r"""
    A `SaladConfig` whose defaults are the released MegaLoc: every backbone block trained, 64 clusters of 256
    channels, a 256-d scene token and a learned projection of the 16640-d aggregation to 8448 dimensions.

    num_trainable_blocks (`int`, *optional*): the last blocks trained; `None` (the default) means every block.
    cluster_dim (`int`, defaults to 256): channels l of each cluster feature.
    projection_dim (`int`, defaults to 8448): width of the linear projection (with bias) after the aggregation,
        followed by L2 normalisation; the descriptor width.
    """

    model_type = "megaloc"

    num_trainable_blocks: int | None = None
    cluster_dim: int = 256
    projection_dim: int | None = 8448

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_trainable_blocks is None:
            self.num_trainable_blocks = self.backbone_config.num_hidden_layers

    def validate_architecture(self):
        """Part of `@strict` validation: MegaLoc always has its projection."""
        super().validate_architecture()
        if self.projection_dim is None:
            raise ValueError("a MegaLoc config needs projection_dim (use a SaladConfig for no projection)")


__all__ = ["MegaLocConfig"]
