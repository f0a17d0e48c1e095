"""Official checkpoints -> ``save_pretrained`` folders (config, safetensors, image processor)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, PreTrainedModel

from ..modeling.image_processing import vpr_image_processor
from ..utils import MODEL_FOLDER, atomic_write_dir, check_replaceable
from .checkpoint import check_keys, check_shapes, load_checkpoint, strip_prefix

OFFICIAL_RESIZE_RULES = {"salad": "pil_antialias", "selavpr": "tensor_bilinear", "cricavpr": "tensor_bilinear"}
# model name -> module with ``convert_state_dict(state_dict, num_attention_heads=None)``
CONVERTERS = {
    "salad": "vprhub.conversion.salad",
    "selavpr": "vprhub.conversion.selavpr",
    "cricavpr": "vprhub.conversion.cricavpr",
    "megaloc": "vprhub.conversion.megaloc",
}
# DataParallel prefix used by the released SelaVPR and CricaVPR files.
DATA_PARALLEL_PREFIX = "module."


def convert_state_dict(model_name: str, state_dict: dict, num_attention_heads: int | None = None) -> PreTrainedModel:
    """Build the vprhub model holding the weights of an official ``state_dict``."""
    if model_name not in CONVERTERS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(CONVERTERS)}")
    if num_attention_heads is not None and num_attention_heads < 1:
        raise ValueError(f"the number of attention heads must be positive, got {num_attention_heads}")
    converter = importlib.import_module(CONVERTERS[model_name])
    try:
        config, weights = converter.convert_state_dict(strip_prefix(state_dict, DATA_PARALLEL_PREFIX), num_attention_heads)
    except StrictDataclassError as error:
        raise ValueError(f"the checkpoint implies an invalid {model_name} config: {error}") from None
    _check_heads(getattr(config, "backbone_config", config))
    model = AutoModel.from_config(config)
    check_keys(model_name, weights, model.state_dict())
    check_shapes(model_name, weights, model.state_dict())
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _check_heads(vit_config) -> None:
    """The ViT width must split evenly into its attention heads."""
    width, heads = vit_config.hidden_size, vit_config.num_attention_heads
    if width % heads:
        divisors = [d for d in range(1, width + 1) if width % d == 0 and d <= 64]
        raise ValueError(
            f"{heads} attention heads do not divide the ViT width {width}; choose a divisor of {width} "
            f"(e.g. {', '.join(map(str, divisors))}; DINOv2 uses one head per 64 channels)"
        )


def convert_checkpoint(
    model_name: str,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    num_attention_heads: int | None = None,
) -> PreTrainedModel:
    """Convert an official checkpoint file into a ``save_pretrained`` folder (with its modeling code), written atomically."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite, MODEL_FOLDER, inputs=[checkpoint])
    state_dict = load_checkpoint(checkpoint)
    try:
        model = convert_state_dict(model_name, state_dict, num_attention_heads)
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}") from None
    # The official evaluation preprocessing (see modeling.image_processing.RESIZE_RULES).
    rule = OFFICIAL_RESIZE_RULES.get(model_name, "pil_antialias")
    processor = vpr_image_processor(*model.config.image_size, resize_rule=rule)
    with atomic_write_dir(out_dir, overwrite=overwrite, kind=MODEL_FOLDER, inputs=[checkpoint]) as tmp:
        model.save_pretrained(tmp)  # with its modeling code and auto_map
        processor.save_pretrained(tmp)
    return model


__all__ = ["CONVERTERS", "convert_checkpoint", "convert_state_dict"]
