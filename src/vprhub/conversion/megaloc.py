"""Official MegaLoc checkpoint (gmberton/MegaLoc ``model.safetensors``) -> ``MegaLocModel`` weights.

The released file is a plain state_dict: ``backbone.*`` (the DINOv2 ViT, no mask token),
``aggregator.agg.*`` (the SALAD aggregation, same names as SALAD's) and ``aggregator.linear.*``
(the projection).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..modeling.configuration_megaloc import MegaLocConfig
from .dinov2 import convert_dinov2_keys, dinov2_config_from_state_dict

BACKBONE_PREFIX = "backbone."
AGGREGATION_PREFIX = "aggregator.agg."
PROJECTION_PREFIX = "aggregator.linear."
OFFICIAL_IMAGE_SIZE = [322, 322]  # processor size: SALAD's evaluation size (the official forward takes any multiple of 14)
_REQUIRED = (
    "backbone.cls_token",
    "aggregator.agg.score.3.weight",
    "aggregator.agg.cluster_features.3.weight",
    "aggregator.agg.token_features.0.weight",
    "aggregator.agg.token_features.2.weight",
    "aggregator.linear.weight",
    "aggregator.linear.bias",
)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> tuple[MegaLocConfig, dict[str, torch.Tensor]]:
    """Infer the MegaLoc config from tensor shapes and rename the weights to ``MegaLocModel``'s."""
    missing = [key for key in _REQUIRED if key not in state_dict]
    if missing:
        raise ValueError(f"not a MegaLoc checkpoint: missing keys {missing}; first keys found: {sorted(state_dict)[:8]}")
    prefixes = (BACKBONE_PREFIX, AGGREGATION_PREFIX, PROJECTION_PREFIX)
    unexpected = sorted(key for key in state_dict if not key.startswith(prefixes))
    if unexpected:
        raise ValueError(f"not a MegaLoc checkpoint: unexpected keys {unexpected[:12]}")
    vit = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    backbone, leftovers = convert_dinov2_keys(vit)
    if leftovers:
        raise ValueError(f"not a MegaLoc checkpoint: unexpected backbone keys {sorted(leftovers)[:12]}")
    backbone_config = dinov2_config_from_state_dict(vit, num_attention_heads)
    config = MegaLocConfig(
        backbone_config=backbone_config,
        pos_embed_rule="dinov2_hub",
        num_trainable_blocks=backbone_config.num_hidden_layers,
        final_norm=True,
        num_clusters=state_dict["aggregator.agg.score.3.weight"].shape[0],
        cluster_dim=state_dict["aggregator.agg.cluster_features.3.weight"].shape[0],
        token_dim=state_dict["aggregator.agg.token_features.2.weight"].shape[0],
        head_hidden_dim=state_dict["aggregator.agg.token_features.0.weight"].shape[0],
        projection_dim=state_dict["aggregator.linear.weight"].shape[0],
        image_size=OFFICIAL_IMAGE_SIZE,
    )
    weights = {f"backbone.{k}": v for k, v in backbone.items()}
    for key, tensor in state_dict.items():
        if key.startswith(AGGREGATION_PREFIX):
            weights["aggregator." + key.removeprefix(AGGREGATION_PREFIX)] = tensor
        elif key.startswith(PROJECTION_PREFIX):
            weights["projection." + key.removeprefix(PROJECTION_PREFIX)] = tensor
    return config, weights
