"""The VPR image processor: a transformers ViT image processor configured for place recognition,
and the one rule that finds the processor belonging to a model."""

from __future__ import annotations

import json
from typing import Any

from transformers import AutoImageProcessor, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file, logging

logger = logging.get_logger(__name__)


def vpr_image_processor(height: int, width: int) -> ViTImageProcessorPil:
    """Resize to exactly ``height x width`` (bilinear, no crop), scale to [0, 1], ImageNet mean/std.

    This is the evaluation transform of the official SALAD, SelaVPR and CricaVPR code.
    """
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": height, "width": width},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def model_image_processor(model: PreTrainedModel) -> Any:
    """The image processor saved with ``model``: from the folder or Hub repository it was loaded from,
    at the same revision (``config._commit_hash``).

    Only when none was saved there (or the model was built in memory) is the VPR processor at
    ``config.image_size`` used, and that is logged. A ``preprocessor_config.json`` that cannot be
    read is an error naming it, never replaced by a default.
    """
    source = model.name_or_path
    revision = getattr(model.config, "_commit_hash", None)
    path = None
    if source:
        path = cached_file(
            source,
            IMAGE_PROCESSOR_NAME,
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
        )
    if path is None:
        height, width = model.config.image_size
        where = f"{source!r} has no {IMAGE_PROCESSOR_NAME}" if source else "the model was not loaded from a folder"
        logger.warning(f"{where}: using the VPR image processor at config.image_size {height}x{width}")
        return vpr_image_processor(height, width)
    try:
        return AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the image processor {path}: {error}") from None
