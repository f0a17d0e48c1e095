"""Checks shared by the vprhub configurations, and the transformers version they need.

This module is imported first by every vprhub configuration, also as remote code on the Hub,
so an older transformers fails here with a clear message rather than on a missing name.
"""

from __future__ import annotations

import transformers
from packaging.version import Version

# SubConfigSpec (nested backbone configs) and the Dinov2 q_proj/k_proj/v_proj/o_proj names arrived in 5.20.
MIN_TRANSFORMERS_VERSION = "5.20.0"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"vprhub models require transformers >= {MIN_TRANSFORMERS_VERSION}, found {transformers.__version__}: "
        f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )

from transformers import PreTrainedConfig  # noqa: E402
from transformers.configuration_utils import SubConfigSpec  # noqa: E402, F401 (the configurations import it from here)

# Bumped whenever a saved config of an older format can no longer be read as is.
VPR_CONFIG_VERSION = 1
# Set as ``_auto_class`` on every config class: saving writes the code file and ``auto_map`` (as
# ``register_for_auto_class`` would), so a saved folder loads with trust_remote_code=True without vprhub.
CONFIG_AUTO_CLASS = "AutoConfig"
POS_EMBED_RULES = ("dinov2_hub", "transformers")


class VPRConfig(PreTrainedConfig):
    """The base of the vprhub configurations: overrides given to ``from_pretrained`` (``from_dict``)
    are validated as constructor arguments are, not first when the config is saved or used."""

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).validate()
        return loaded


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
