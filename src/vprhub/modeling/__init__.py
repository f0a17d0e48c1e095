"""vprhub models: SALAD, SelaVPR, CricaVPR and MegaLoc on transformers' Dinov2.

Names are imported on first use: registering the configurations with ``AutoConfig`` must not
import the models (transformers may still be importing its own modeling modules then).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# model_type -> ("module.ConfigClass", "module.ModelClass"), modules relative to this package;
# `vprhub.registration` registers them with the Auto classes.
MODEL_TYPES = {
    "salad": ("configuration_salad.SaladConfig", "modeling_salad.SaladModel"),
    "cricavpr": ("configuration_cricavpr.CricaVPRConfig", "modeling_cricavpr.CricaVPRModel"),
    "selavpr": ("configuration_selavpr.SelaVPRConfig", "modeling_selavpr.SelaVPRModel"),
    "megaloc": ("configuration_megaloc.MegaLocConfig", "modeling_megaloc.MegaLocModel"),
}
# The image processor of every model type, registered with AutoImageProcessor.
IMAGE_PROCESSOR_CLASS = "image_processing_vpr.VPRImageProcessor"

# public name -> module of this package defining it
_EXPORTS = {
    "CricaVPRConfig": "configuration_cricavpr",
    "CricaVPRModel": "modeling_cricavpr",
    "CricaVPROutput": "modeling_cricavpr",
    "MegaLocConfig": "configuration_megaloc",
    "MegaLocModel": "modeling_megaloc",
    "SaladConfig": "configuration_salad",
    "SaladModel": "modeling_salad",
    "SaladOutput": "modeling_salad",
    "SelaVPRConfig": "configuration_selavpr",
    "SelaVPRModel": "modeling_selavpr",
    "SelaVPROutput": "modeling_selavpr",
    "VPRImageProcessor": "image_processing_vpr",
    "VPRPreTrainedModel": "pretrained",
    "mark_trainable": "pretrained",
    "vpr_image_processor": "image_processing",
}

if TYPE_CHECKING:
    from .configuration_cricavpr import CricaVPRConfig
    from .configuration_megaloc import MegaLocConfig
    from .configuration_salad import SaladConfig
    from .configuration_selavpr import SelaVPRConfig
    from .image_processing import vpr_image_processor
    from .image_processing_vpr import VPRImageProcessor
    from .modeling_cricavpr import CricaVPRModel, CricaVPROutput
    from .modeling_megaloc import MegaLocModel
    from .modeling_salad import SaladModel, SaladOutput
    from .modeling_selavpr import SelaVPRModel, SelaVPROutput
    from .pretrained import VPRPreTrainedModel, mark_trainable

    MODEL_CLASSES: dict[str, tuple[type, type]]


def load_class(path: str) -> type:
    """The class at ``"module.Name"`` (module relative to this package)."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __getattr__(name: str) -> Any:
    if name == "MODEL_CLASSES":  # model_type -> (config class, model class)
        value = {model_type: (load_class(c), load_class(m)) for model_type, (c, m) in MODEL_TYPES.items()}
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["IMAGE_PROCESSOR_CLASS", "MODEL_CLASSES", "MODEL_TYPES", "load_class", *sorted(_EXPORTS)]
