"""Official SelaVPR checkpoint (Lu-Feng/SelaVPR ``GeoLocalizationNet`` state_dict) -> ``SelaVPRModel`` weights.

The released ``SelaVPR_*.pth`` files hold ``{"model_state_dict": ...}`` with DataParallel's
``module.`` prefix; the common conversion code unwraps and strips both before calling
:func:`convert_state_dict`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..modeling.configuration_selavpr import SelaVPRConfig
from ..modeling.modeling_selavpr import PARALLEL_ADAPTER, SERIAL_ADAPTER
from .dinov2 import convert_dinov2_keys, dinov2_config_from_state_dict

BACKBONE_PREFIX = "backbone."
OFFICIAL_IMAGE_SIZE = [224, 224]  # parser.py --resize default; the official network only runs at 224
_HEADS = {
    "aggregation.1.p": "gem.p",
    "LocalAdapt.upconv1.weight": "local_head.upconv1.weight",
    "LocalAdapt.upconv1.bias": "local_head.upconv1.bias",
    "LocalAdapt.upconv2.weight": "local_head.upconv2.weight",
    "LocalAdapt.upconv2.bias": "local_head.upconv2.bias",
}
_ADAPTERS = {"adapter1": SERIAL_ADAPTER, "adapter2": PARALLEL_ADAPTER}
_PROJECTIONS = {"D_fc1": "down_proj", "D_fc2": "up_proj"}
_ADAPTER_KEY = re.compile(r"blocks\.(\d+)\.(adapter[12])\.(D_fc[12])\.(weight|bias)")


def _convert_adapter_keys(leftovers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.<i>.adapter{1,2}.D_fc{1,2}.*`` -> ``backbone.encoder.layer.<i>.adapters.{serial,parallel}.*``."""
    unknown = sorted(key for key in leftovers if not _ADAPTER_KEY.fullmatch(key))
    if unknown:
        raise ValueError(f"not a SelaVPR checkpoint: unexpected backbone keys {unknown[:12]}")
    converted = {}
    for key, tensor in leftovers.items():
        index, adapter, projection, kind = _ADAPTER_KEY.fullmatch(key).groups()
        name = f"backbone.encoder.layer.{index}.adapters.{_ADAPTERS[adapter]}.{_PROJECTIONS[projection]}.{kind}"
        converted[name] = tensor
    return converted


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_attention_heads: int | None = None
) -> tuple[SelaVPRConfig, dict[str, torch.Tensor]]:
    """Infer the SelaVPR config from tensor shapes and rename the weights to ``SelaVPRModel``'s."""
    required = (*_HEADS, "backbone.blocks.0.adapter1.D_fc1.weight", "backbone.blocks.0.adapter2.D_fc1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"not a SelaVPR checkpoint: missing keys {missing}; first keys found: {sorted(state_dict)[:8]}"
        )
    vit = {k.removeprefix(BACKBONE_PREFIX): v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    unexpected = sorted(k for k in state_dict if not k.startswith(BACKBONE_PREFIX) and k not in _HEADS)
    if unexpected:
        raise ValueError(f"not a SelaVPR checkpoint: unexpected keys {unexpected[:12]}")
    backbone_config = dinov2_config_from_state_dict(vit, num_attention_heads)
    backbone, leftovers = convert_dinov2_keys(vit)
    adapters = _convert_adapter_keys(leftovers)

    width = backbone_config.hidden_size
    bottlenecks = {vit[f"blocks.0.{a}.D_fc1.weight"].shape[0] for a in _ADAPTERS}
    if len(bottlenecks) != 1:
        raise ValueError(f"SelaVPR adapters of different widths {sorted(bottlenecks)} are not supported")
    bottleneck = bottlenecks.pop()
    upconv1, upconv2 = state_dict["LocalAdapt.upconv1.weight"], state_dict["LocalAdapt.upconv2.weight"]
    if upconv1.shape[0] != width or upconv2.shape[0] != upconv1.shape[1]:
        raise ValueError(
            f"SelaVPR local head shapes {tuple(upconv1.shape)}, {tuple(upconv2.shape)} do not fit a "
            f"{width}-wide backbone"
        )
    config = SelaVPRConfig(
        backbone_config=backbone_config,
        pos_embed_rule="dinov2_hub",
        adapter_ratio=bottleneck / width,
        local_hidden_dim=upconv1.shape[1],
        local_dim=upconv2.shape[1],
        image_size=OFFICIAL_IMAGE_SIZE,
    )
    if config.adapter_dim != bottleneck:
        raise ValueError(f"adapter width {bottleneck} is not expressible as a ratio of the hidden size {width}")
    weights = {f"backbone.{k}": v for k, v in backbone.items()} | adapters
    weights |= {ours: state_dict[official] for official, ours in _HEADS.items()}
    return config, weights
