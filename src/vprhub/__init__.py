"""vprhub: visual place recognition with DINOv2 foundation models, the transformers way.

Importing the package registers the model types ``salad``, ``selavpr``, ``cricavpr`` and ``megaloc``
with ``AutoConfig``/``AutoModel`` and the ``place-recognition`` pipeline task (when transformers
loads those, see ``vprhub.registration``). The names below are imported on first use, so
``import vprhub`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registration import register_with_transformers

__version__ = "0.1.0"

# public name -> module defining it
_EXPORTS = {
    "CricaVPRConfig": "vprhub.modeling",
    "CricaVPRModel": "vprhub.modeling",
    "CricaVPROutput": "vprhub.modeling",
    "MegaLocConfig": "vprhub.modeling",
    "MegaLocModel": "vprhub.modeling",
    "SaladConfig": "vprhub.modeling",
    "SaladModel": "vprhub.modeling",
    "SaladOutput": "vprhub.modeling",
    "SelaVPRConfig": "vprhub.modeling",
    "SelaVPRModel": "vprhub.modeling",
    "SelaVPROutput": "vprhub.modeling",
    "VPRImageProcessor": "vprhub.modeling",
    "mark_trainable": "vprhub.modeling",
    "vpr_image_processor": "vprhub.modeling",
    "rerank": "vprhub.modeling.local_matching",
    "build_model": "vprhub.factory",
    "PlaceIndex": "vprhub.pipelines",
    "PlaceRecognitionPipeline": "vprhub.pipelines",
    "plot_matches": "vprhub.pipelines",
    "build_index": "vprhub.pipelines",
    "Embedder": "vprhub.embedding",
}

if TYPE_CHECKING:
    from .factory import build_model
    from .modeling import (
        CricaVPRConfig,
        CricaVPRModel,
        CricaVPROutput,
        MegaLocConfig,
        MegaLocModel,
        SaladConfig,
        SaladModel,
        SaladOutput,
        SelaVPRConfig,
        SelaVPRModel,
        SelaVPROutput,
        VPRImageProcessor,
        mark_trainable,
        vpr_image_processor,
    )
    from .modeling.local_matching import rerank
    from .embedding import Embedder
    from .pipelines import PlaceIndex, PlaceRecognitionPipeline, build_index, plot_matches


# subpackages and modules reachable as attributes (``vprhub.hub.push_model``) without importing them first
_SUBMODULES = (
    "conversion", "data", "embedding", "evaluation", "factory", "hub", "image_io", "modeling", "pipelines", "training", "utils"
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"vprhub.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vprhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


register_with_transformers()

__all__ = sorted(_EXPORTS)
