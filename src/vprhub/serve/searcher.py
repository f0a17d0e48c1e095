"""The model side of the service: a batch of photos in, one list of hits per photo out."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image

from ..evaluation.geo_folder import parse_utm
from ..embedding import Embeddings
from ..pipelines import PlaceIndex
from ..pipelines.place_recognition import PlaceRecognitionPipeline


@dataclasses.dataclass(frozen=True)
class Query:
    """One uploaded photo and how many hits it asks for."""

    image: Image.Image
    top_k: int


def position(metadata: Mapping[str, Any]) -> dict | None:
    """Where an entry was taken, from its metadata: ``{"x", "y", "frame"}`` or ``None``.

    Read from ``utm`` (``[east, north]``), ``utm_east`` + ``utm_north``, ``lat`` + ``lon``, or a
    gmberton ``@east@north@...`` file name in ``path``, in this order.
    """
    try:
        if "utm" in metadata:
            east, north = metadata["utm"]
            return {"x": float(east), "y": float(north), "frame": "utm"}
        if "utm_east" in metadata and "utm_north" in metadata:
            return {"x": float(metadata["utm_east"]), "y": float(metadata["utm_north"]), "frame": "utm"}
        if "lat" in metadata and "lon" in metadata:
            return {"x": float(metadata["lon"]), "y": float(metadata["lat"]), "frame": "wgs84"}
        if isinstance(metadata.get("path"), str):
            east, north = parse_utm(metadata["path"])
            return {"x": east, "y": north, "frame": "utm"}
    except (TypeError, ValueError):
        pass
    return None


def image_file(metadata: Mapping[str, Any]) -> str | None:
    """The entry's image file, when its metadata records one that exists."""
    path = metadata.get("path")
    return path if isinstance(path, str) and os.path.isfile(path) else None


class PlaceSearcher:
    """One :class:`PlaceIndex` and the model that built it.

    Refuses what cannot be served: a model other than the index's, a batch-dependent model
    (CricaVPR in ``batch_mode="batch"``: a photo's descriptor would depend on the strangers
    batched with it), and re-ranking without SelaVPR local features.
    """

    def __init__(
        self, pipe: PlaceRecognitionPipeline, index: PlaceIndex, rerank: bool = False, rerank_candidates: int = 100
    ) -> None:
        if pipe.batch_dependent:
            raise ValueError(
                f"{pipe.model.config.model_type} in batch_mode='batch' cannot be served: each descriptor depends on "
                "the other photos of its batch, so a client's answer would depend on other clients' photos; "
                "serve a model (and index) with batch_mode='independent'"
            )
        index.check_compatible(pipe.identity())
        if rerank and not pipe.produces_local_features:
            raise ValueError(f"re-ranking needs a SelaVPR model, got {pipe.model.config.model_type}")
        if rerank and index.local_features is None:
            raise ValueError("re-ranking needs an index that stores local features (build it with a SelaVPR model)")
        self.pipe, self.index = pipe, index
        self.rerank, self.rerank_candidates = rerank, rerank_candidates

    def embed_batch(self, images: list[Image.Image]) -> Embeddings:
        """Descriptors (+ local features when re-ranking) of a batch of photos, in one forward pass.

        The one place where the service calls the model.
        """
        return self.pipe.engine.embed(images, local_features=self.rerank, batch_size=len(images))

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(height, width)`` the model sees, if known: uploads are opened for it (a large JPEG at
        reduced size, as a file would be)."""
        return self.pipe.engine.preprocessing.size

    @property
    def max_hits(self) -> int:
        """The most hits a photo can get: every entry of the map, or every re-ranked candidate."""
        return min(len(self.index), self.rerank_candidates) if self.rerank else len(self.index)

    def check_top_k(self, top_k: int) -> None:
        """``ValueError`` unless ``top_k`` is positive (a ``top_k`` above :attr:`max_hits` gets them all,
        as in ``PlaceIndex.search`` and the pipeline)."""
        if top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")

    def search(self, queries: list[Query]) -> list[list[dict] | ValueError]:
        """Hits for every query, or the ``ValueError`` of queries that failed: one forward pass for
        all, one index search per distinct ``top_k``."""
        embeddings = self.embed_batch([query.image for query in queries])
        results: list[list[dict] | ValueError] = [[] for _ in queries]
        wanted = [min(query.top_k, self.max_hits) for query in queries]
        for top_k in sorted(set(wanted)):
            rows = [i for i, k in enumerate(wanted) if k == top_k]
            local = embeddings.local_features
            try:
                found = self.pipe.postprocess_batch(
                    embeddings.descriptors[rows],
                    None if local is None else torch.from_numpy(local[rows]),
                    index=self.index,
                    top_k=top_k,
                    rerank=self.rerank,
                    rerank_candidates=self.rerank_candidates,
                )
            except ValueError as err:
                found = [err] * len(rows)
            for row, hits in zip(rows, found):
                results[row] = hits if isinstance(hits, ValueError) else [self.hit(hit) for hit in hits]
        return results

    @staticmethod
    def hit(hit: dict) -> dict:
        """A pipeline hit as the service returns it: id, score, metadata, and position / image when known."""
        entry = {"id": hit["index"], "score": hit["score"], "metadata": hit["metadata"]}
        if "rerank_score" in hit:
            entry["rerank_score"] = hit["rerank_score"]
        where = position(hit["metadata"])
        if where is not None:
            entry["position"] = where
        if image_file(hit["metadata"]) is not None:
            entry["image_url"] = f"/images/{hit['index']}"
        return entry

    def info(self) -> dict:
        """Model identity, descriptor width, map size and backend."""
        identity = self.pipe.identity()
        return {
            "model": {key: identity[key] for key in ("name_or_path", "model_type", "config_hash")},
            "descriptor_dim": self.pipe.descriptor_dim,
            "map_size": len(self.index),
            "backend": {"name": getattr(self.index, "backend", "faiss"), "structure": self.index.factory},
            "rerank": self.rerank,
            "device": str(self.pipe.device),
        }
