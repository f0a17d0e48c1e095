"""Official checkpoints -> ``save_pretrained`` folders (config, safetensors, image processor)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModel, PreTrainedModel

from ..modeling.image_processing import vpr_image_processor
from ..utils import atomic_write_dir
from .checkpoint import check_keys, load_checkpoint, strip_prefix

OFFICIAL_RESIZE_RULES = {"salad": "pil_antialias", "selavpr": "tensor_bilinear", "cricavpr": "tensor_bilinear"}
# model name -> module with ``convert_state_dict(state_dict, num_attention_heads=None)``
CONVERTERS = {
    "salad": "vprhub.conversion.salad",
    "selavpr": "vprhub.conversion.selavpr",
    "cricavpr": "vprhub.conversion.cricavpr",
}
# DataParallel prefix used by the released SelaVPR and CricaVPR files.
DATA_PARALLEL_PREFIX = "module."


def convert_state_dict(model_name: str, state_dict: dict, num_attention_heads: int | None = None) -> PreTrainedModel:
    """Build the vprhub model holding the weights of an official ``state_dict``."""
    if model_name not in CONVERTERS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {sorted(CONVERTERS)}")
    converter = importlib.import_module(CONVERTERS[model_name])
    try:
        config, weights = converter.convert_state_dict(strip_prefix(state_dict, DATA_PARALLEL_PREFIX), num_attention_heads)
    except StrictDataclassError as error:
        raise ValueError(f"the checkpoint implies an invalid {model_name} config: {error}") from None
    model = AutoModel.from_config(config)
    check_keys(model_name, weights, model.state_dict())
    model.load_state_dict(weights, strict=True)
    return model.eval()


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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
    state_dict = load_checkpoint(checkpoint)
    try:
        model = convert_state_dict(model_name, state_dict, num_attention_heads)
    except ValueError as error:
        raise ValueError(f"{checkpoint}: {error}") from None
    # The official evaluation preprocessing (see modeling.image_processing.RESIZE_RULES).
    rule = OFFICIAL_RESIZE_RULES.get(model_name, "pil_antialias")
    processor = vpr_image_processor(*model.config.image_size, resize_rule=rule)
    from ..hub import save_with_remote_code

    with atomic_write_dir(out_dir, overwrite=overwrite) as tmp:
        save_with_remote_code(model, tmp)
        processor.save_pretrained(tmp)
    return model


__all__ = ["CONVERTERS", "convert_checkpoint", "convert_state_dict"]
