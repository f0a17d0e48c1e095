"""vprhub: visual place recognition with DINOv2 foundation models, the transformers way.

Importing the package registers the model types ``salad``, ``selavpr`` and ``cricavpr``
with ``AutoConfig``/``AutoModel`` and the ``place-recognition`` pipeline task.
"""

from transformers import AutoConfig, AutoModel

from .embedding import Embedder
from .factory import build_model
from .modeling import (
    MODEL_CLASSES,
    CricaVPRConfig,
    CricaVPRModel,
    CricaVPROutput,
    SaladConfig,
    SaladModel,
    SaladOutput,
    SelaVPRConfig,
    SelaVPRModel,
    SelaVPROutput,
    vpr_image_processor,
)
from .modeling.local_matching import rerank
from .pipelines import PlaceIndex, PlaceRecognitionPipeline, build_index, plot_matches, register_pipeline

__version__ = "0.1.0"

for _model_type, (_config_class, _model_class) in MODEL_CLASSES.items():
    AutoConfig.register(_model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
register_pipeline()

__all__ = [
    "CricaVPRConfig",
    "CricaVPRModel",
    "CricaVPROutput",
    "Embedder",
    "PlaceIndex",
    "build_index",
    "PlaceRecognitionPipeline",
    "SaladConfig",
    "SaladModel",
    "SaladOutput",
    "SelaVPRConfig",
    "SelaVPRModel",
    "SelaVPROutput",
    "build_model",
    "plot_matches",
    "rerank",
    "vpr_image_processor",
]
