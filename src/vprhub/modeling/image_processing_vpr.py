"""The VPR image processor: transformers' Pillow ViT processor with a ``resize_rule``.

Self-contained (transformers, numpy, torch, Pillow and :mod:`.rgb` only): saving the processor copies this file
into the folder with ``auto_map``, so ``AutoImageProcessor.from_pretrained(folder,
trust_remote_code=True)`` gives the same processor where vprhub is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.processing_utils import ImagesKwargs, Unpack

from .rgb import to_rgb

#: How images reach the model's size (saved as ``resize_rule`` in ``preprocessor_config.json``):
#: ``"pil_antialias"``: Pillow bilinear resize (antialiased) of the 8-bit image, then rescale and
#: normalise (SALAD's official evaluation, torchvision ``Resize`` on PIL);
#: ``"tensor_bilinear"``: rescale and normalise at full size, then resize the float tensor bilinearly
#: without antialiasing (SelaVPR's and CricaVPR's official evaluation, ``transforms.functional.resize``
#: on a tensor with the torchvision of their time).
RESIZE_RULES = ("pil_antialias", "tensor_bilinear")
# Set as ``_auto_class``: saving writes this file and ``auto_map`` (as ``register_for_auto_class`` would).
IMAGE_PROCESSOR_AUTO_CLASS = "AutoImageProcessor"


class VPRImageProcessorKwargs(ImagesKwargs, total=False):
    """``resize_rule`` (`str`, one of ``RESIZE_RULES``): the order of resizing and normalising."""

    resize_rule: str


def check_resize_rule(resize_rule: str, size: SizeDict | None) -> None:
    """A known rule; ``"tensor_bilinear"`` resizes to an exact size only."""
    if resize_rule not in RESIZE_RULES:
        raise ValueError(f"resize_rule must be one of {RESIZE_RULES}, got {resize_rule!r}")
    if resize_rule == "tensor_bilinear" and not (size and size.height and size.width):
        raise ValueError(f"resize_rule 'tensor_bilinear' needs size {{'height', 'width'}}, got {dict(size or {})}")


class VPRImageProcessor(ViTImageProcessorPil):
    """Exact-size resize, rescale and normalise, in the order ``resize_rule`` says; Pillow backend always.

    Images are converted to RGB (``do_convert_rgb``) as vprhub reads them: alpha is dropped
    (``Image.convert("RGB")``), not composited on white.
    """

    valid_kwargs = VPRImageProcessorKwargs
    _auto_class = IMAGE_PROCESSOR_AUTO_CLASS
    do_convert_rgb = True
    resize_rule = "pil_antialias"

    def __init__(self, **kwargs: Unpack[VPRImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)
        check_resize_rule(self.resize_rule, self.size)

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> np.ndarray:
        """RGB ``[H, W, 3]``; a PIL image as vprhub's image reader converts it (:func:`.rgb.to_rgb`)."""
        if isinstance(image, Image.Image):
            return np.array(to_rgb(image))
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    def _validate_preprocess_kwargs(self, resize_rule: str = "pil_antialias", size: SizeDict | None = None, **kwargs) -> None:
        check_resize_rule(resize_rule, size)
        super()._validate_preprocess_kwargs(size=size, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        resize_rule: str = "pil_antialias",
        **kwargs: Any,
    ) -> BatchFeature:
        """``"pil_antialias"``: transformers' order; ``"tensor_bilinear"``: rescale and normalise at full
        size, then a bilinear resize of the float tensor (``align_corners=False``, no antialiasing)."""
        if resize_rule == "tensor_bilinear" and do_resize:
            scale = rescale_factor if do_rescale else 1.0
            mean, std = (image_mean, image_std) if do_normalize else (0.0, 1.0)
            images = [_normalised_then_resized(image, (size.height, size.width), scale, mean, std) for image in images]
            do_resize = do_rescale = do_normalize = False
        return super()._preprocess(
            images,
            do_resize=do_resize,
            size=size,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            **kwargs,
        )


def _normalised_then_resized(
    image: np.ndarray, size: tuple[int, int], scale: float, mean: Any, std: Any
) -> np.ndarray:
    """``[C, H, W]`` -> float32 ``(image * scale - mean) / std`` resized to ``size`` as a tensor."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    channels = pixels.shape[0]
    mean = torch.as_tensor(mean, dtype=torch.float32).expand(channels).view(channels, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).expand(channels).view(channels, 1, 1)
    pixels = (pixels * scale - mean) / std
    resized = torch.nn.functional.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=False)
    return resized[0].numpy()


__all__ = ["RESIZE_RULES", "VPRImageProcessor"]
