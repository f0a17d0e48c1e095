"""Compressed descriptor storage: named options that become faiss index structures.

Every option is a faiss ``index_factory`` string, so the transform (PCA, whitening, ITQ
rotation) is trained on the database, saved inside ``index.faiss`` with the codes, and applied
to queries by faiss itself (``IndexPreTransform``):

==================  =====================================  ===========================
option              faiss structure                        bytes per D-d vector
==================  =====================================  ===========================
``fp16``            ``SQfp16``                             2 D
``sq8``             ``SQ8`` (8-bit scalar quantiser)       D
``pca{W}``          ``PCA{W},L2norm,Flat``                 4 W
``pca{W}-fp16``     ``PCA{W},L2norm,SQfp16``               2 W
``pca{W}-sq8``      ``PCA{W},L2norm,SQ8``                  W
``pq{M}``           ``PQ{M}x8np``                          M
``pca{W}-pq{M}``    ``PCA{W},L2norm,PQ{M}x8np``            M
``ivfpq{M}``        ``IVF{n},PQ{M}x8np``                   M (+ list ids)
``binary{B}``       ``ITQ{B},LSHt`` (Hamming)              B / 8
==================  =====================================  ===========================

``pcaw{W}...`` is the same with whitening (``PCAW``: each component divided by the square
root of its eigenvalue); both are fitted on the database and followed by L2 normalisation.
Whitening pays when the W kept components all carry signal; when W exceeds the descriptors'
intrinsic dimension it amplifies noise (on the synthetic city, 48 latent dimensions, PCAW256
kept 20 % of the exact recall@1, PCA256 without whitening all of it; ``vprhub index plan``
measures both). Binary codes are searched by Hamming distance h and scored ``1 - 2 h / B``.
Plus an 8-byte id per entry in every option (``IndexIDMap2``).
"""

from __future__ import annotations

import math
import re

import numpy as np

_PATTERNS = {
    r"fp16": lambda m, d, n: "SQfp16",
    r"sq8": lambda m, d, n: "SQ8",
    r"pca(w?)(\d+)": lambda m, d, n: f"PCA{m[1].upper()}{_width(m[2], d, n)},L2norm,Flat",
    r"pca(w?)(\d+)-fp16": lambda m, d, n: f"PCA{m[1].upper()}{_width(m[2], d, n)},L2norm,SQfp16",
    r"pca(w?)(\d+)-sq8": lambda m, d, n: f"PCA{m[1].upper()}{_width(m[2], d, n)},L2norm,SQ8",
    r"pq(\d+)": lambda m, d, n: f"PQ{_sub(m[1], d)}x8np",
    r"pca(w?)(\d+)-pq(\d+)": lambda m, d, n: f"PCA{m[1].upper()}{_width(m[2], d, n)},L2norm,PQ{_sub(m[3], int(m[2]))}x8np",
    r"ivfpq(\d+)": lambda m, d, n: f"IVF{_lists(n)},PQ{_sub(m[1], d)}x8np",
    r"binary(\d+)": lambda m, d, n: f"ITQ{_bits(m[1], d, n)},LSHt",
}
COMPRESSIONS = (
    "fp16", "sq8", "pca{W}", "pcaw{W}", "pca{W}-fp16", "pca{W}-sq8", "pq{M}", "pca{W}-pq{M}", "ivfpq{M}", "binary{B}"
)


def _width(text: str, dim: int, num_train: int) -> int:
    width = int(text)
    if not 1 <= width <= dim:
        raise ValueError(f"PCA width {width} must be between 1 and the descriptor width {dim}")
    if num_train and width > num_train:
        raise ValueError(f"PCA to {width} dimensions needs at least {width} database descriptors, got {num_train}")
    return width


def _sub(text: str, dim: int) -> int:
    sub = int(text)
    if sub < 1 or dim % sub:
        raise ValueError(f"PQ with {sub} sub-quantisers needs a width divisible by {sub}, got {dim}")
    return sub


def _bits(text: str, dim: int, num_train: int) -> int:
    bits = int(text)
    if bits < 8 or bits % 8 or bits > dim:
        raise ValueError(f"binary codes need a multiple of 8 bits up to the width {dim}, got {bits}")
    if num_train and bits > num_train:
        raise ValueError(f"{bits}-bit codes (a PCA to {bits} dimensions) need at least {bits} database descriptors")
    return bits


def _lists(num_train: int) -> int:
    return int(np.clip(round(4 * math.sqrt(max(num_train, 1))), 1, max(1, num_train // 39)))


def is_compression(option: str) -> bool:
    return any(re.fullmatch(p, option) for p in _PATTERNS)


def compression_factory(option: str, dim: int, num_train: int = 0) -> str:
    """The faiss factory string of a compression option (see the table above)."""
    for pattern, build in _PATTERNS.items():
        match = re.fullmatch(pattern, option)
        if match:
            return build(match, dim, num_train)
    raise ValueError(f"unknown compression {option!r}: use one of {', '.join(COMPRESSIONS)}")


def synthetic_city(
    dim: int, places: int = 300, views: int = 4, latent: int = 48, noise: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Descriptors of a synthetic city: ``(database, db_places, queries, query_places)``.

    Real VPR descriptors vary along few directions: each place is a random point of a
    ``latent``-dimensional space mapped to ``dim`` by a fixed random linear map; each view adds
    a latent perturbation (viewpoint, light) and a little isotropic noise; then L2
    normalisation. The database holds ``views`` views per place, the queries one more view.
    """
    rng = np.random.default_rng(seed)
    lift = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((places, latent)).astype(np.float32)

    def view(place_ids: np.ndarray) -> np.ndarray:
        z = centres[place_ids] + noise * rng.standard_normal((len(place_ids), latent)).astype(np.float32)
        x = z @ lift + 0.3 * rng.standard_normal((len(place_ids), dim)).astype(np.float32) / np.sqrt(dim) * np.linalg.norm(
            z @ lift, axis=1, keepdims=True
        )
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db_places = np.repeat(np.arange(places), views)
    query_places = np.arange(places)
    return view(db_places), db_places, view(query_places), query_places


def place_recall(found: np.ndarray, db_places: np.ndarray, query_places: np.ndarray, k: int) -> float:
    """Fraction of queries with a view of their own place among the first ``k`` hits."""
    hits = np.where(found[:, :k] >= 0, db_places[np.maximum(found[:, :k], 0)], -1)
    return float((hits == query_places[:, None]).any(axis=1).mean())
