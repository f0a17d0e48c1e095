"""The ``place-recognition`` pipeline: images in, global descriptors or ranked places out."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline, PreTrainedModel
from transformers.image_utils import load_image

from ..modeling.image_processing import model_image_processor
from ..modeling.local_matching import mutual_nn_matches
from ..modeling.local_matching import rerank as local_rerank
from .index import PlaceIndex

TASK = "place-recognition"
DEFAULT_RERANK_CANDIDATES = 100  # the official SelaVPR `--rerank_num`
# Config entries that describe how a model was saved or called, not what it computes.
_BOOKKEEPING_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "custom_pipelines",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
_PROCESSOR_CLASS_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class"})
_PROBE_SIZE = 64


def load_place_image(image: Any, timeout: float | None = None) -> Image.Image:
    """An RGB PIL image from a path, URL, PIL image or array (``[H, W]``, ``[H, W, C]``, ``[C, H, W]``).

    Arrays are uint8, or floats in [0, 1]. Anything unreadable raises a ``ValueError`` naming it.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    if isinstance(image, (str, os.PathLike)):
        source = str(image)
        is_url = source.startswith(("http://", "https://"))
        if not is_url and not os.path.isfile(source):
            raise ValueError(f"image file not found: {source}")
        try:
            return load_image(source, timeout=timeout).convert("RGB")
        except Exception as err:  # PIL and httpx raise many types for bad data
            raise ValueError(f"cannot read image {source}: {err}") from None
    raise ValueError(
        f"unsupported image input of type {type(image).__name__}: expected a path, URL, PIL image or numpy array"
    )


def _array_to_image(array: np.ndarray) -> Image.Image:
    shape = array.shape
    if array.ndim == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"array image must be [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got shape {shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"float array image must hold values in [0, 1] (shape {shape})")
        array = np.round(array * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"array image must be uint8 or float in [0, 1], got {array.dtype} (shape {shape})")
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def config_hash(config: Any) -> str:
    """SHA-256 of a model config without its bookkeeping entries (paths, versions, dtype)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if k not in _BOOKKEEPING_KEYS}
        return value

    blob = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def processor_signature(image_processor: Any) -> dict:
    """The image processor's settings as plain JSON (class names left out: PIL and torch
    backends of the same settings are interchangeable)."""
    settings = json.loads(image_processor.to_json_string())
    return {k: v for k, v in settings.items() if k not in _PROCESSOR_CLASS_KEYS}


def _probe_images() -> list[Image.Image]:
    """Two fixed images whose descriptors fingerprint a model + preprocessing."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, _PROBE_SIZE)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)
    noise = rng.integers(0, 256, (_PROBE_SIZE, _PROBE_SIZE, 3))
    return [Image.fromarray(a.astype(np.uint8)) for a in (smooth, noise)]


class PlaceRecognitionPipeline(Pipeline):
    """Global place descriptors of images, or their nearest places in a :class:`PlaceIndex`.

    ```python
    pr = pipeline("place-recognition", model="./salad-dinov2")
    pr(["a.jpg", pil_image, "https://.../b.jpg"])          # [np.ndarray [D] float32, ...]
    pr("q.jpg", index=index, top_k=5)                      # [{"score", "index", "metadata"}, ...]
    pr("q.jpg", index=index, top_k=5, rerank=True)         # SelaVPR: re-ranked by local features
    ```

    Inputs: paths, URLs, PIL images or numpy arrays, one or a list. Preprocessing is the
    ``image_processor`` given, else the model's saved one (its folder or repository, same
    revision; see ``model_image_processor``); only a model saved without one gets the VPR
    processor at ``config.image_size`` (logged).

    Call parameters:
        index (`PlaceIndex`): search this index; a model other than the one that built it is refused.
        top_k (`int`, defaults to 5): hits per query.
        rerank (`bool`): re-rank the ``rerank_candidates`` best global hits by the number of
            mutual nearest neighbours of SelaVPR local features (official rule, ties kept in
            global order); needs an index that stores local features.
        rerank_candidates (`int`, defaults to 100): candidates re-ranked (the official K).
        return_correspondences (`bool`): with ``rerank``, add to each hit its mutual-NN
            ``"correspondences"``, ``[M, 2, 2]`` ((x, y) query, (x, y) candidate) in [0, 1]
            image coordinates (local-map cell centres), for :func:`plot_matches`.
        return_local_features (`bool`): without index, return ``{"descriptor", "local_features"}``.
        timeout (`float`): seconds allowed to fetch a URL.

    Batching rule (it matters for CricaVPR with ``batch_mode="batch"``, whose descriptors
    depend on the batch): a list is cut into consecutive batches of ``batch_size`` inputs in
    the given order, the last one possibly smaller (the transformers pipeline ``DataLoader``);
    a single input is a batch of one. ``PlaceIndex.build`` uses the same rule on the readable
    database images and records its ``batch_size``; when a query of a batch-dependent model
    gives no ``batch_size``, the index's is used, so that queries are batched as the database
    was (the official evaluation batches queries and database alike, never mixed).
    """

    _load_processor = False
    _load_image_processor = False  # model_image_processor finds it, for a model object too
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: PreTrainedModel, image_processor: Any = None, **kwargs: Any) -> None:
        if image_processor is None:
            image_processor = model_image_processor(model)
        model.eval()
        self._identity: dict | None = None
        super().__init__(model=model, image_processor=image_processor, **kwargs)

    # ------------------------------------------------------------------ model facts
    @property
    def descriptor_dim(self) -> int:
        return int(self.model.config.descriptor_dim)

    @property
    def produces_local_features(self) -> bool:
        return self.model.config.model_type == "selavpr"

    @property
    def batch_dependent(self) -> bool:
        """True when a descriptor depends on the other images of its batch (CricaVPR batch mode)."""
        return getattr(self.model.config, "batch_mode", None) == "batch"

    def identity(self) -> dict:
        """What a :class:`PlaceIndex` records to refuse queries from another model: name, type,
        config hash, descriptor width, image-processor settings and probe descriptors (two fixed
        images; they catch other weights under the same configuration)."""
        if self._identity is None:
            pixels = torch.cat([self.preprocess(image)["pixel_values"] for image in _probe_images()])
            probe = self.forward({"pixel_values": pixels})["descriptors"].float().numpy()
            self._identity = {
                "name_or_path": self.model.name_or_path or None,
                "model_type": self.model.config.model_type,
                "config_hash": config_hash(self.model.config),
                "descriptor_dim": self.descriptor_dim,
                "image_processor": processor_signature(self.image_processor),
                "probe": probe.round(6).tolist(),
            }
        return self._identity

    # ------------------------------------------------------------------ Pipeline API
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Descriptors (``np.float32 [D]``) or hits (``[{"score", "index", "metadata"}]``) per input."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            raise ValueError("no images given")
        index = kwargs.get("index", self._postprocess_params.get("index"))
        if (
            self.batch_dependent
            and kwargs.get("batch_size") is None
            and self._batch_size is None
            and index is not None
            and (index.build_report or {}).get("batch_size")
        ):
            kwargs["batch_size"] = index.build_report["batch_size"]
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        index: PlaceIndex | None = None,
        top_k: int | None = None,
        rerank: bool | None = None,
        rerank_candidates: int | None = None,
        return_correspondences: bool | None = None,
        return_local_features: bool | None = None,
        timeout: float | None = None,
    ) -> tuple[dict, dict, dict]:
        preprocess = {} if timeout is None else {"timeout": timeout}
        postprocess: dict[str, Any] = {}
        if index is not None:
            if not isinstance(index, PlaceIndex):
                raise ValueError(f"index must be a PlaceIndex, got {type(index).__name__}")
            index.check_compatible(self.identity())
            postprocess["index"] = index
        for name, value in (("top_k", top_k), ("rerank_candidates", rerank_candidates)):
            if value is not None:
                if not isinstance(value, (int, np.integer)) or value < 1:
                    raise ValueError(f"{name} must be a positive integer, got {value!r}")
                postprocess[name] = int(value)
        if rerank is not None:
            postprocess["rerank"] = bool(rerank)
        if return_local_features is not None:
            postprocess["return_local_features"] = bool(return_local_features)
        if return_correspondences is not None:
            postprocess["return_correspondences"] = bool(return_correspondences)
        forward = {}
        if rerank or return_local_features:
            if not self.produces_local_features:
                raise ValueError(
                    f"{self.model.config.model_type} models produce no local features: "
                    "re-ranking needs a SelaVPR model"
                )
            forward["local_features"] = True
        return preprocess, forward, postprocess

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        pixel_values = self.image_processor(load_place_image(image, timeout), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values.to(self.dtype)}

    def _forward(self, model_inputs: dict[str, torch.Tensor], local_features: bool = False) -> dict:
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        result = {"descriptors": outputs.descriptors}
        if local_features:
            result["local_features"] = outputs.local_features
        return result

    def postprocess(
        self,
        model_outputs: dict,
        index: PlaceIndex | None = None,
        top_k: int = 5,
        rerank: bool = False,
        rerank_candidates: int = DEFAULT_RERANK_CANDIDATES,
        return_correspondences: bool = False,
        return_local_features: bool = False,
    ) -> Any:
        descriptor = model_outputs["descriptors"][0].float().numpy()
        local = model_outputs.get("local_features")
        local = local[0].float() if local is not None else None
        if index is None:
            if rerank:
                raise ValueError("rerank=True needs an index")
            if return_local_features:
                return {"descriptor": descriptor, "local_features": local.numpy()}
            return descriptor
        if not rerank:
            if return_correspondences:
                raise ValueError("return_correspondences=True needs rerank=True")
            scores, ids = index.search(descriptor, top_k)
            return self._hits(index, scores[0], ids[0])
        hits, candidates = self._reranked_hits(index, descriptor, local, top_k, rerank_candidates)
        if return_correspondences:
            for hit, candidate in zip(hits, candidates):
                hit["correspondences"] = _unit_coordinates(mutual_nn_matches(local, candidate), local.shape[:2])
        return hits

    # ------------------------------------------------------------------ hits
    @staticmethod
    def _hits(index: PlaceIndex, scores: np.ndarray, ids: np.ndarray, rerank_scores: Any = None) -> list[dict]:
        found = ids >= 0
        scores, ids = scores[found], ids[found]
        hits = [
            {"score": float(s), "index": int(i), "metadata": m}
            for s, i, m in zip(scores, ids, index.metadata(ids))
        ]
        if rerank_scores is not None:
            for hit, value in zip(hits, rerank_scores[found]):
                hit["rerank_score"] = float(value)
        return hits

    def _reranked_hits(
        self, index: PlaceIndex, descriptor: np.ndarray, local: torch.Tensor, top_k: int, candidates: int
    ) -> tuple[list[dict], torch.Tensor]:
        """Hits re-ranked by local features, and the candidates' local maps in hit order."""
        if index.local_features is None:
            raise ValueError("this index stores no local features: rebuild it with a SelaVPR model to re-rank")
        if top_k > candidates:
            raise ValueError(f"top_k={top_k} is larger than rerank_candidates={candidates}")
        if top_k > len(index):
            raise ValueError(f"top_k={top_k} is larger than the index ({len(index)} entries)")
        scores, ids = index.search(descriptor, min(candidates, len(index)))
        scores, ids = scores[0], ids[0]
        ids, scores = ids[ids >= 0], scores[ids >= 0]
        stored = torch.from_numpy(index.local_features.get(ids))
        order, local_scores = local_rerank(local, stored)
        order = order[:top_k].numpy()
        return self._hits(index, scores[order], ids[order], local_scores.numpy()[order]), stored[order]


def _unit_coordinates(pairs: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Flattened (query, candidate) map positions ``[M, 2]`` -> cell centres ``[M, 2, (x, y)]`` in [0, 1]."""
    height, width = grid
    pairs = pairs.numpy()
    return np.stack([(pairs % width + 0.5) / width, (pairs // width + 0.5) / height], axis=-1).astype(np.float32)


def as_pipeline(pipeline_or_model: Any, **kwargs: Any) -> PlaceRecognitionPipeline:
    """A :class:`PlaceRecognitionPipeline` from a pipeline, a vprhub model, or a model path / hub id."""
    if isinstance(pipeline_or_model, PlaceRecognitionPipeline):
        return pipeline_or_model
    if isinstance(pipeline_or_model, PreTrainedModel):
        return PlaceRecognitionPipeline(model=pipeline_or_model, task=TASK, **kwargs)
    if isinstance(pipeline_or_model, (str, os.PathLike)):
        from transformers import pipeline

        from . import register_pipeline

        register_pipeline()
        return pipeline(TASK, model=str(pipeline_or_model), **kwargs)
    raise ValueError(
        f"expected a PlaceRecognitionPipeline, a vprhub model or a model path, got {type(pipeline_or_model).__name__}"
    )
