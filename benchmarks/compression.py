"""Compression and backends: recall against bytes per image, and Milvus against faiss.

    python benchmarks/compression.py [--quick | --full] [--dim 8448] [--places 1000]
        [--options fp16,pca256-fp16,...] [--backend-entries 100000]

1. Recall@1 / @5 (a view of the query's place among the first hits) against bytes per image
   (the growth of ``index.faiss`` per entry, an 8-byte id included, the fixed-size trained
   transform excluded) for every compression option,
   on the synthetic city (:func:`vprhub.pipelines.compression.synthetic_city`: places in a
   48-d latent space lifted to ``--dim``, 4 database views + 1 query view per place), with
   exact float32 search as the reference; build time per option.
2. Backends: ``--backend-entries`` random clustered vectors in a faiss flat index and in a
   milvus-lite collection: build (insert) time, batched query latency, and whether Milvus
   returns the same ids (and scores to 1e-5) as faiss flat.

``--quick`` (default) uses 512-d descriptors, 300 places and 2000 backend entries (< 2 min on
2 shared cores); ``--full`` 8448-d, 1000 places and 10^5 backend entries.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from vprhub.pipelines import PlaceIndex
from vprhub.pipelines.compression import place_recall, synthetic_city

OPTIONS = ("fp16", "sq8", "pca256", "pcaw256", "pca256-fp16", "pca128-fp16", "pca256-pq64", "pq64", "binary512")


def recall_figures(dim: int, places: int, options: list[str]) -> None:
    database, db_places, queries, query_places = synthetic_city(dim, places=places, views=4)
    print(f"synthetic city: {len(database)} database / {len(queries)} query descriptors, {dim}-d "
          f"(float32 = {4 * dim} B per image)")
    print(f"{'option':<14} {'factory':<26} {'B/image':>8} {'1/x f32':>8} {'R@1':>6} {'R@5':>6} {'kept R@1':>9} {'build s':>8}")
    exact_r1 = None
    with tempfile.TemporaryDirectory() as tmp:
        for option in ["flat", *options]:
            start = time.perf_counter()
            index = PlaceIndex(dim, index_type=option)
            index.add(database)
            seconds = time.perf_counter() - start
            index.save(Path(tmp) / option)
            half = PlaceIndex(dim, index_type=option)
            half.add(database[: len(database) // 2])
            half.save(Path(tmp) / f"{option}-half")
            sizes = [(Path(tmp) / name / "index.faiss").stat().st_size for name in (option, f"{option}-half")]
            per_image = (sizes[0] - sizes[1]) / (len(database) - len(database) // 2)  # without the fixed transform
            _, found = index.search(queries, 5)
            r1, r5 = (place_recall(found, db_places, query_places, k) for k in (1, 5))
            exact_r1 = r1 if option == "flat" else exact_r1
            print(f"{option:<14} {index.factory:<26} {per_image:>8.0f} {4 * dim / per_image:>8.1f} {r1:>6.3f} "
                  f"{r5:>6.3f} {100 * r1 / exact_r1:>8.1f}% {seconds:>8.2f}", flush=True)


def backend_figures(dim: int, entries: int, queries: int = 100, k: int = 10) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(1, entries // 50), dim)).astype(np.float32)
    data = np.empty((entries, dim), np.float32)
    for start in range(0, entries, 5000):
        x = centres[rng.integers(0, len(centres), min(5000, entries - start))]
        x += rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(dim)
        data[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = data[rng.integers(0, entries, queries)] + rng.standard_normal((queries, dim), dtype=np.float32) * 0.5 / np.sqrt(dim)
    print(f"backends: {entries} x {dim}-d float32 entries, {queries} queries batched, top-{k}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("faiss", "milvus"):
            start = time.perf_counter()
            kwargs = {"backend": "milvus", "uri": str(Path(tmp) / "bench.db")} if backend == "milvus" else {}
            index = PlaceIndex(dim, **kwargs)
            for s in range(0, entries, 10_000):
                index.add(data[s : s + 10_000])
            build = time.perf_counter() - start
            start = time.perf_counter()
            results[backend] = index.search(q, k)
            latency = (time.perf_counter() - start) / queries * 1000
            print(f"  {backend:<7} build {build:8.1f} s ({entries / build:8.0f} vectors/s)   search {latency:8.2f} ms/query")
            index.close()
    (fs, fi), (ms, mi) = results["faiss"], results["milvus"]
    differ = np.flatnonzero((fi != mi).any(axis=1))
    # a differing row is acceptable only as another order of equal scores (ties, within 1e-5)
    ties = [r for r in differ if np.abs(fs[r] - ms[r]).max() <= 1e-5]
    print(f"  Milvus vs faiss flat: {len(q) - len(differ)}/{len(q)} queries with identical ranked ids, "
          f"{len(ties)} more whose ids differ only among equal scores (ties), "
          f"max score difference {np.abs(fs - ms).max():.2e} (tolerance 1e-5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="8448-d, 1000 places, 10^5 backend entries")
    parser.add_argument("--quick", action="store_true", help="the default: small sizes")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--places", type=int)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--backend-entries", type=int)
    parser.add_argument("--skip-recall", action="store_true")
    parser.add_argument("--skip-backends", action="store_true")
    args = parser.parse_args()
    dim = args.dim or (8448 if args.full else 512)
    places = args.places or (1000 if args.full else 300)
    entries = args.backend_entries or (100_000 if args.full else 2000)
    if not args.skip_recall:
        recall_figures(dim, places, [o for o in args.options.split(",") if o])
    if not args.skip_backends:
        backend_figures(dim, entries)


if __name__ == "__main__":
    main()
