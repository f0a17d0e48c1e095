"""The ``place-recognition`` pipeline: images in, global descriptors or ranked places out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Pipeline, PreTrainedModel

from ..embedding import Embedder, precision_of
from ..modeling.image_processing import model_image_processor
from ..modeling.local_matching import mutual_nn_matches
from ..modeling.local_matching import rerank as local_rerank
from .index import PlaceIndex

TASK = "place-recognition"
DEFAULT_RERANK_CANDIDATES = 100  # the official SelaVPR `--rerank_num`
DEFAULT_BATCH_SIZE = 32  # for models whose descriptors do not depend on the batch


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
        top_k (`int`, defaults to 5): hits per query (at most the number of index entries).
        rerank (`bool`): re-rank the ``rerank_candidates`` best global hits by the number of
            mutual nearest neighbours of SelaVPR local features (official rule, ties kept in
            global order); needs an index that stores local features.
        rerank_candidates (`int`, defaults to 100): candidates re-ranked (the official K).
        return_correspondences (`bool`): with ``rerank``, add to each hit its mutual-NN
            ``"correspondences"``, ``[M, 2, 2]`` ((x, y) query, (x, y) candidate) in [0, 1]
            image coordinates (local-map cell centres), for :func:`plot_matches`.
        return_local_features (`bool`): without index, return ``{"descriptor", "local_features"}``.
        timeout (`float`): seconds allowed to fetch a URL.

    Images go through :class:`vprhub.embedding.Embedder` (the one image -> descriptor path)
    and each batch is searched in the index with one call.

    Batching rule (it matters for CricaVPR with ``batch_mode="batch"``, whose descriptors
    depend on the batch): a list is cut into consecutive batches of ``batch_size`` inputs in
    the given order, the last one possibly smaller; a single input is a batch of one. Index
    building uses the same rule on the readable database images and records its
    ``batch_size``; when a query of a batch-dependent model gives no ``batch_size``, the
    index's is used, so that queries are batched as the database was (the official
    evaluation batches queries and database alike, never mixed). Batch-independent models
    default to batches of :data:`DEFAULT_BATCH_SIZE`.
    """

    _load_processor = False
    _load_image_processor = False  # model_image_processor finds it, for a model object too
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: PreTrainedModel, image_processor: Any = None, **kwargs: Any) -> None:
        if image_processor is None:
            image_processor = model_image_processor(model)
        model.eval()
        super().__init__(model=model, image_processor=image_processor, **kwargs)
        self.engine = Embedder(
            self.model, self.image_processor, device=self.device, precision=precision_of(self.model), num_workers=0
        )

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
        """What a :class:`PlaceIndex` records to refuse queries from another model (see
        :meth:`vprhub.embedding.Embedder.identity`)."""
        return self.engine.identity()

    # ------------------------------------------------------------------ Pipeline API
    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Descriptors (``np.float32 [D]``) or hits (``[{"score", "index", "metadata"}]``) per input."""
        single = not isinstance(inputs, (list, tuple))
        images = [inputs] if single else list(inputs)
        if not images:
            raise ValueError("no images given")
        batch_size = kwargs.pop("batch_size", None)
        batch_size = self._batch_size if batch_size is None else batch_size
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        kwargs.pop("num_workers", None)
        preprocess, forward, postprocess = self._sanitize_parameters(**kwargs)
        # the pipeline's own defaults (given to pipeline(...)) under this call's, as in transformers
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        postprocess = {**self._postprocess_params, **postprocess}
        index = postprocess.get("index")
        searching = [k for k in ("top_k", "rerank", "rerank_candidates", "return_correspondences") if postprocess.get(k)]
        if index is None and searching:
            raise ValueError(f"search options ({', '.join(searching)}) need index= (a PlaceIndex)")
        if batch_size is None and self.batch_dependent:
            batch_size = (index.build_report or {}).get("batch_size") if index is not None else None
            batch_size = batch_size or 1
        batch_size = batch_size or DEFAULT_BATCH_SIZE
        results: list = []
        for start in range(0, len(images), batch_size):
            batch = self.engine.embed(
                images[start : start + batch_size],
                local_features=forward.get("local_features", False),
                batch_size=batch_size,
                timeout=preprocess.get("timeout"),
            )
            local = torch.from_numpy(batch.local_features) if batch.local_features is not None else None
            results += self.postprocess_batch(batch.descriptors, local, **postprocess)
        return results[0] if single else results

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
        pixels = self.engine.preprocessing.decode(image, timeout)
        return {"pixels": torch.from_numpy(pixels)[None]}

    def _forward(self, model_inputs: dict[str, torch.Tensor], local_features: bool = False) -> dict:
        descriptors, local = self.engine.forward(model_inputs["pixels"], local_features)
        result = {"descriptors": torch.from_numpy(descriptors)}
        if local is not None:
            result["local_features"] = torch.from_numpy(local)
        return result

    def postprocess(self, model_outputs: dict, **params: Any) -> Any:
        """Result of one image from model outputs ``{"descriptors" [1, D], "local_features"?}``."""
        local = model_outputs.get("local_features")
        return self.postprocess_batch(model_outputs["descriptors"].float().numpy(), local, **params)[0]

    def postprocess_batch(
        self,
        descriptors: np.ndarray,
        local: torch.Tensor | None,
        index: PlaceIndex | None = None,
        top_k: int = 5,
        rerank: bool = False,
        rerank_candidates: int = DEFAULT_RERANK_CANDIDATES,
        return_correspondences: bool = False,
        return_local_features: bool = False,
    ) -> list:
        """Results of a batch: ``descriptors [B, D]``, ``local [B, h, w, C]``; the index is searched once."""
        local = local.float() if local is not None else None
        if index is None:
            if rerank:
                raise ValueError("rerank=True needs an index")
            if return_local_features:
                return [{"descriptor": d, "local_features": m.numpy()} for d, m in zip(descriptors, local)]
            return list(descriptors)
        if not rerank:
            if return_correspondences:
                raise ValueError("return_correspondences=True needs rerank=True")
            scores, ids = index.search(descriptors, top_k)
            return [self._hits(index, s, i) for s, i in zip(scores, ids)]
        if index.local_storage is None:
            raise ValueError("this index stores no local features: rebuild it with a SelaVPR model to re-rank")
        if top_k > rerank_candidates:
            raise ValueError(f"top_k={top_k} is larger than rerank_candidates={rerank_candidates}")
        all_scores, all_ids = index.search(descriptors, min(rerank_candidates, len(index)))
        results = []
        for scores, ids, query_local in zip(all_scores, all_ids, local):
            hits, candidates = self._reranked_hits(index, scores, ids, query_local, top_k)
            if return_correspondences:
                for hit, candidate in zip(hits, candidates):
                    pairs = mutual_nn_matches(query_local, candidate)
                    hit["correspondences"] = _unit_coordinates(pairs, query_local.shape[:2])
            results.append(hits)
        return results

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
        self, index: PlaceIndex, scores: np.ndarray, ids: np.ndarray, local: torch.Tensor, top_k: int
    ) -> tuple[list[dict], torch.Tensor]:
        """Global candidates re-ranked by local features, and their local maps in hit order."""
        ids, scores = ids[ids >= 0], scores[ids >= 0]
        stored = torch.from_numpy(self._candidate_maps(index, ids))
        order, local_scores = local_rerank(local, stored)
        order = order[:top_k].numpy()
        return self._hits(index, scores[order], ids[order], local_scores.numpy()[order]), stored[order]


    def _candidate_maps(self, index: PlaceIndex, ids: np.ndarray) -> np.ndarray:
        """The candidates' local maps: from the index's store, or re-embedded from their image paths."""
        if index.local_storage != "recompute":
            return index.local_features.get(ids)
        root = Path((index.build_report or {}).get("image_root") or ".")
        paths = []
        for entry_id, row in zip(ids.tolist(), index.metadata(ids)):
            if "path" not in row:
                raise ValueError(f"entry {entry_id} has no 'path' in its metadata: its local features cannot be recomputed")
            paths.append(root / row["path"])
        return self.engine.embed(paths, local_features=True).local_features


def _unit_coordinates(pairs: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Flattened (query, candidate) map positions ``[M, 2]`` -> cell centres ``[M, 2, (x, y)]`` in [0, 1]."""
    height, width = grid
    pairs = pairs.numpy()
    return np.stack([(pairs % width + 0.5) / width, (pairs // width + 0.5) / height], axis=-1).astype(np.float32)


def as_pipeline(pipeline_or_model: Any, **kwargs: Any) -> PlaceRecognitionPipeline:
    """A :class:`PlaceRecognitionPipeline` from a pipeline, a vprhub model, or a model path / hub id
    (opened by :func:`vprhub.loading.load_model`: no code from the folder unless ``trust_remote_code=True``)."""
    if isinstance(pipeline_or_model, PlaceRecognitionPipeline):
        return pipeline_or_model
    if isinstance(pipeline_or_model, PreTrainedModel):
        return PlaceRecognitionPipeline(model=pipeline_or_model, task=TASK, **kwargs)
    if isinstance(pipeline_or_model, (str, os.PathLike)):
        from ..loading import load_model

        model = load_model(pipeline_or_model, "model", trust_remote_code=kwargs.pop("trust_remote_code", False))
        return PlaceRecognitionPipeline(model=model, task=TASK, **kwargs)
    raise ValueError(
        f"expected a PlaceRecognitionPipeline, a vprhub model or a model path, got {type(pipeline_or_model).__name__}"
    )
