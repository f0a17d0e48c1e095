"""The VPR image processor: a transformers ViT image processor configured for place recognition."""

from __future__ import annotations

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil


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
