"""The VPR image processor: a transformers ViT image processor configured for place recognition,
and the one rule that finds the processor belonging to a model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file, logging

from ..errors import ModelFileError, short_error

logger = logging.get_logger(__name__)

#: How images reach the model's size (saved as ``resize_rule`` in ``preprocessor_config.json``):
#: ``"pil_antialias"``: Pillow bilinear resize (antialiased) of the 8-bit image, then rescale and
#: normalise (the processor's own call; SALAD's official evaluation, torchvision ``Resize`` on PIL);
#: ``"tensor_bilinear"``: rescale and normalise at full size, then resize the float tensor bilinearly
#: without antialiasing (SelaVPR's and CricaVPR's official evaluation, ``transforms.functional.resize``
#: on a tensor with the torchvision of their time).
RESIZE_RULES = ("pil_antialias", "tensor_bilinear")


def vpr_image_processor(height: int, width: int, resize_rule: str = "pil_antialias") -> ViTImageProcessorPil:
    """Resize to exactly ``height x width`` (bilinear, no crop), scale to [0, 1], ImageNet mean/std.

    This is the evaluation transform of the official SALAD, SelaVPR and CricaVPR code; ``resize_rule``
    (one of ``RESIZE_RULES``) says in which order, applied by :func:`preprocess_images`.
    """
    if resize_rule not in RESIZE_RULES:
        raise ValueError(f"resize_rule must be one of {RESIZE_RULES}, got {resize_rule!r}")
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": height, "width": width},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        resize_rule=resize_rule,
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
    return read_image_processor(source, f"the image processor {path}", revision=revision)


def read_image_processor(source: str, label: str, revision: str | None = None, **overrides: Any) -> Any:
    """The image processor saved in the folder or Hub repository ``source``, else one short error
    line naming ``label`` (its ``preprocessor_config.json``). ``overrides`` go to ``from_pretrained``."""
    try:
        return AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=False, **overrides)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(f"cannot read {label}: {short_error(error)}") from None


def preprocess_images(image_processor, images) -> torch.Tensor:
    """``pixel_values`` ``[B, 3, H, W]`` of RGB PIL ``images`` by ``image_processor``'s ``resize_rule``
    (a processor without one, e.g. saved before the rule existed, uses ``"pil_antialias"``)."""
    rule = getattr(image_processor, "resize_rule", "pil_antialias")
    if rule == "pil_antialias":
        return image_processor(images, return_tensors="pt")["pixel_values"]
    if rule != "tensor_bilinear":
        raise ValueError(f"unknown resize_rule {rule!r} in the image processor; expected one of {RESIZE_RULES}")
    size = (image_processor.size["height"], image_processor.size["width"])
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        pixels = (pixels * image_processor.rescale_factor - mean) / std
        batch.append(
            torch.nn.functional.interpolate(
                pixels[None], size=size, mode="bilinear", align_corners=False, antialias=False
            )[0]
        )
    return torch.stack(batch)
