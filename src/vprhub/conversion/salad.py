"""Official DINOv2 SALAD checkpoint (serizba/salad ``VPRModel`` state_dict) -> ``SaladModel`` weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..modeling.configuration_salad import SaladConfig
from .dinov2 import convert_dinov2_keys, dinov2_config_from_state_dict

BACKBONE_PREFIX = "backbone.model."
AGGREGATOR_PREFIX = "aggregator."
OFFICIAL_IMAGE_SIZE = [322, 322]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> tuple[SaladConfig, dict[str, torch.Tensor]]:
    """Infer the SALAD config from tensor shapes and rename the weights to ``SaladModel``'s."""
    vit = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    aggregator = {k: v for k, v in state_dict.items() if k.startswith(AGGREGATOR_PREFIX)}
    required = ("aggregator.score.3.weight", "aggregator.cluster_features.3.weight", "aggregator.token_features.2.weight")
    missing = [k for k in required if k not in aggregator]
    if not vit or missing:
        raise ValueError(
            f"not a SALAD checkpoint: expected keys under {BACKBONE_PREFIX!r} and {AGGREGATOR_PREFIX!r}; "
            f"missing {missing or 'backbone keys'}; first keys found: {sorted(state_dict)[:8]}"
        )
    backbone_config = dinov2_config_from_state_dict(vit, num_attention_heads)
    backbone, leftovers = convert_dinov2_keys(vit)
    if leftovers:
        raise ValueError(f"not a SALAD checkpoint: unexpected backbone keys {sorted(leftovers)[:12]}")
    config = SaladConfig(
        backbone_config=backbone_config,
        pos_embed_rule="dinov2_hub",
        num_trainable_blocks=4,
        final_norm=True,
        num_clusters=aggregator["aggregator.score.3.weight"].shape[0],
        cluster_dim=aggregator["aggregator.cluster_features.3.weight"].shape[0],
        token_dim=aggregator["aggregator.token_features.2.weight"].shape[0],
        head_hidden_dim=aggregator["aggregator.token_features.0.weight"].shape[0],
        image_size=OFFICIAL_IMAGE_SIZE,
    )
    weights = {f"backbone.{k}": v for k, v in backbone.items()} | aggregator
    return config, weights
