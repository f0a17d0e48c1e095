"""The VPR image processor (:class:`VPRImageProcessor`) configured for place recognition, and the one
rule that finds the processor belonging to a model."""

from __future__ import annotations

from typing import Any

from transformers import AutoImageProcessor, PreTrainedModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file, logging

from ..errors import ModelFileError, short_error
from .image_processing_vpr import RESIZE_RULES, VPRImageProcessor

logger = logging.get_logger(__name__)

__all__ = ["RESIZE_RULES", "VPRImageProcessor", "model_image_processor", "read_image_processor", "vpr_image_processor"]


def vpr_image_processor(height: int, width: int, resize_rule: str = "pil_antialias") -> VPRImageProcessor:
    """Resize to exactly ``height x width`` (bilinear, no crop), scale to [0, 1], ImageNet mean/std.

    This is the evaluation transform of the official SALAD, SelaVPR and CricaVPR code; ``resize_rule``
    (one of ``RESIZE_RULES``) says in which order.
    """
    return VPRImageProcessor(
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
    line naming ``label`` (its ``preprocessor_config.json``). ``overrides`` go to ``from_pretrained``.

    A processor saved by an older vprhub (transformers' ``ViTImageProcessor`` with a ``resize_rule``
    key) is read as the :class:`VPRImageProcessor` of the same settings, so that its rule holds."""
    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision, trust_remote_code=False, **overrides)
        if hasattr(processor, "resize_rule") and not isinstance(processor, VPRImageProcessor):
            processor = VPRImageProcessor.from_pretrained(source, revision=revision, **overrides)
        return processor
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelFileError(f"cannot read {label}: {short_error(error)}") from None
