"""vprhub: visual place recognition with DINOv2 foundation models, the transformers way.

Importing the package registers the model types ``salad``, ``selavpr`` and ``cricavpr``
with ``AutoConfig``/``AutoModel`` and the ``place-recognition`` pipeline task.
"""

from transformers import AutoConfig, AutoModel

from .factory import build_model
from .modeling import MODEL_CLASSES, SaladConfig, SaladModel, SaladOutput, vpr_image_processor
from .modeling import SelaVPRConfig, SelaVPRModel, SelaVPROutput
from .modeling import CricaVPRConfig, CricaVPRModel, CricaVPROutput
from .modeling.local_matching import rerank

__version__ = "0.1.0"

for _model_type, (_config_class, _model_class) in MODEL_CLASSES.items():
    AutoConfig.register(_model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)

__all__ = [
    "CricaVPRConfig",
    "CricaVPRModel",
    "CricaVPROutput",
    "SaladConfig",
    "SaladModel",
    "SaladOutput",
    "SelaVPRConfig",
    "SelaVPRModel",
    "SelaVPROutput",
    "build_model",
    "rerank",
    "vpr_image_processor",
]
