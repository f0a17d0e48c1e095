"""Retrieval: the ``place-recognition`` pipeline, the faiss-backed PlaceIndex, match plots."""

from .build import build_index
from .index import INDEX_TYPES, PlaceIndex
from .place_recognition import TASK, PlaceRecognitionPipeline, as_pipeline
from .plotting import plot_matches


def register_pipeline() -> None:
    """Register ``PlaceRecognitionPipeline`` as the transformers task ``place-recognition`` (idempotent)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is PlaceRecognitionPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=PlaceRecognitionPipeline, pt_model=AutoModel, type="image")


register_pipeline()


__all__ = [
    "INDEX_TYPES",
    "PlaceIndex",
    "PlaceRecognitionPipeline",
    "TASK",
    "as_pipeline",
    "build_index",
    "plot_matches",
    "register_pipeline",
]
