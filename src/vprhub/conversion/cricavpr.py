"""Official CricaVPR checkpoint (Lu-Feng/CricaVPR ``CricaVPRNet`` state_dict) -> ``CricaVPRModel`` weights."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from ..modeling.configuration_cricavpr import CricaVPRConfig
from ..modeling.modeling_cricavpr import ADAPTER_NAME
from .dinov2 import convert_dinov2_keys, dinov2_config_from_state_dict

BACKBONE_PREFIX = "backbone."
ENCODER_PREFIX = "encoder."
GEM_KEY = "aggregation.1.p"
OFFICIAL_IMAGE_SIZE = [224, 224]
# Not recoverable from tensor shapes: the official values.
OFFICIAL_ENCODER_HEADS = 16
OFFICIAL_ADAPTER_SCALE = 0.2
OFFICIAL_ADAPTER_BN_EPS = 1e-3

_ADAPTER_KEY = re.compile(r"blocks\.(\d+)\.adapter\.(.+)")
# official adapter module names -> ours (applied to each dotted component)
_ADAPTER_NAMES = {
    "D_fc1": "down_proj",
    "D_fc2": "up_proj",
    "branch1": "branch1x1",
    "branch2": "branch3x3",
    "branch3": "branch5x5",
    "bn": "norm",
}
_REQUIRED = (
    "backbone.blocks.0.adapter.D_fc1.weight",
    "backbone.blocks.0.adapter.branch1.conv.weight",
    "backbone.blocks.0.adapter.branch2.0.conv.weight",
    "backbone.blocks.0.adapter.branch2.1.conv.weight",
    "backbone.blocks.0.adapter.branch3.0.conv.weight",
    "backbone.blocks.0.adapter.branch3.1.conv.weight",
    GEM_KEY,
    "encoder.layers.0.linear1.weight",
)


def _adapter_width(state_dict: Mapping[str, torch.Tensor], name: str) -> int:
    """Output channels of module ``name`` of the first block's official adapter."""
    return state_dict[f"backbone.blocks.0.adapter.{name}.weight"].shape[0]


def _adapter_key(index: str, rest: str) -> str:
    renamed = ".".join(_ADAPTER_NAMES.get(part, part) for part in rest.split("."))
    return f"backbone.encoder.layer.{index}.adapters.{ADAPTER_NAME}.{renamed}"


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> tuple[CricaVPRConfig, dict[str, torch.Tensor]]:
    """Infer the CricaVPR config from tensor shapes and rename the weights to ``CricaVPRModel``'s.

    ``num_attention_heads`` is the ViT's (default by width); the cross-image encoder's head count is
    not recoverable from shapes and is set to the official 16.
    """
    missing = [k for k in _REQUIRED if k not in state_dict]
    if missing:
        raise ValueError(
            f"not a CricaVPR checkpoint: missing {missing}; first keys found: {sorted(state_dict)[:8]}"
        )
    vit = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    backbone, leftovers = convert_dinov2_keys(vit)
    weights = {f"backbone.{k}": v for k, v in backbone.items()}
    for key, tensor in leftovers.items():
        match = _ADAPTER_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"not a CricaVPR checkpoint: unexpected backbone key {BACKBONE_PREFIX}{key}")
        weights[_adapter_key(*match.groups())] = tensor
    weights |= {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    weights["pooling.p"] = state_dict[GEM_KEY]
    others = sorted(k for k in state_dict if not k.startswith((BACKBONE_PREFIX, ENCODER_PREFIX)) and k != GEM_KEY)
    if others:
        raise ValueError(f"not a CricaVPR checkpoint: unexpected keys {others[:12]}")

    hidden = vit["cls_token"].shape[-1]
    bottleneck = _adapter_width(state_dict, "D_fc1")
    widths = [_adapter_width(state_dict, name) for name in ("branch1.conv", "branch2.1.conv", "branch3.1.conv")]
    reductions = [_adapter_width(state_dict, name) for name in ("branch2.0.conv", "branch3.0.conv")]
    encoder_width = state_dict["encoder.layers.0.linear1.weight"].shape[1]
    if encoder_width != hidden:
        raise ValueError(f"cross-image encoder width {encoder_width} != backbone width {hidden}")
    try:
        config = CricaVPRConfig(
            backbone_config=dinov2_config_from_state_dict(vit, num_attention_heads),
            pos_embed_rule="dinov2_hub",
            adapter_ratio=bottleneck / hidden,
            adapter_scale=OFFICIAL_ADAPTER_SCALE,
            adapter_branch_fractions=[w / bottleneck for w in widths],
            adapter_reduce_fractions=[r / bottleneck for r in reductions],
            adapter_bn_eps=OFFICIAL_ADAPTER_BN_EPS,
            encoder_num_layers=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers.")),
            encoder_num_heads=OFFICIAL_ENCODER_HEADS,
            encoder_ffn_dim=state_dict["encoder.layers.0.linear1.weight"].shape[0],
            image_size=OFFICIAL_IMAGE_SIZE,
        )
    except StrictDataclassClassValidationError as error:
        raise ValueError(f"unsupported CricaVPR architecture: {error.__cause__ or error}") from None
    return config, weights
