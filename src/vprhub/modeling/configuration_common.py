"""Checks shared by the vprhub configurations."""

from __future__ import annotations

from transformers import PreTrainedConfig

# Bumped whenever a saved config of an older format can no longer be read as is.
VPR_CONFIG_VERSION = 1
POS_EMBED_RULES = ("dinov2_hub", "transformers")


def check_common_fields(config: PreTrainedConfig) -> None:
    """Validate the fields every vprhub config has: version, position rule, image size."""
    if config.vprhub_version > VPR_CONFIG_VERSION:
        raise ValueError(
            f"this {config.model_type} config was written by a newer vprhub (config format "
            f"{config.vprhub_version}; this installation reads up to {VPR_CONFIG_VERSION}): upgrade vprhub"
        )
    if config.pos_embed_rule not in POS_EMBED_RULES:
        raise ValueError(f"pos_embed_rule must be one of {POS_EMBED_RULES}, got {config.pos_embed_rule!r}")
    size = list(config.image_size)
    patch = config.backbone_config.patch_size
    if len(size) != 2 or any(s <= 0 or s % patch for s in size):
        raise ValueError(f"image_size must be [height, width], positive multiples of {patch}, got {size}")
