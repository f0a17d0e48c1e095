"""The VPR image processor: a transformers ViT image processor configured for place recognition."""

from __future__ import annotations

import numpy as np
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

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
