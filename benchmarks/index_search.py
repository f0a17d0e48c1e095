"""PlaceIndex figures on CPU: build rate, query latency, approximate-search recall, and the
local-feature memory policy of SelaVPR re-ranking.

    python benchmarks/index_search.py [--entries 100000] [--dim 8448] [--queries 200]
        [--ivfpq IVF512,PQ64x8np] [--train 20000] [--nprobe 32] [--build-images 64]
        [--local-maps 1000] [--recompute-model large|tiny|none]

1. Build rate: ``build_index`` over generated 480x640 JPEGs through a tiny random SALAD
   (decode, preprocessing, model, faiss add), images/s.
2. Query latency and recall: ``--entries`` descriptors of width ``--dim`` in an exact flat
   index and in an IVF-PQ index trained on ``--train`` of them. Pure random high-dimensional
   vectors are all nearly orthogonal (no neighbours to find), so the descriptors are drawn
   around 2000 random "places" (unit centre + isotropic noise: cosine ~0.5 between two
   entries of a place, ~0 across places), and each query revisits a random database entry
   (that entry + noise, cosine ~0.9 to it), so its exact nearest neighbour is unique.
   Figures: recall@1 / recall@10 = fraction of queries whose exact nearest neighbour is the
   approximate first hit / among the approximate top 10; overlap@10 = mean overlap of the
   approximate and exact top-10 lists (entries 2-10 of a place are near-ties, so this one is
   noisy); right place@1 = first hit from the query's place. Isotropic noise is the worst case
   for product quantisation (it cannot be compressed): real descriptors fare better.
   Single-query latency is the median over 50 queries, with 1 faiss thread (a server answering
   one query per thread) and with all threads: on a busy machine, OpenMP threads left spinning
   by torch and faiss can add ~10 ms to a multi-threaded single query.
3. Local-feature policy: time to gather the K = 100 candidate maps (61x61x128 float16,
   0.95 MB each) from the memory-mapped store, with its pages evicted from the page cache
   first, against recomputing them, i.e. K forward passes of SelaVPR (ViT-L/14 at 224 x 224,
   random weights: the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

import vprhub
from vprhub.pipelines import PlaceIndex, PlaceRecognitionPipeline, build_index
from vprhub.pipelines.local_store import FEATURES_FILE, LocalFeatureStore

NUM_PLACES = 2000
NOISE = 1.0  # noise norm relative to the centre's: cosine to the centre ~ 1 / sqrt(2)
QUERY_NOISE = 0.5  # a query is a database entry + noise: cosine ~0.9 to it


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float = NOISE, chunk: int = 10_000):
    """Unit vectors around random centres (and their centre ids), in chunks to bound temporaries."""
    out = np.empty((count, centres.shape[1]), dtype=np.float32)
    places = rng.integers(0, len(centres), count) if count != len(centres) else np.arange(count)
    for start in range(0, count, chunk):
        x = centres[places[start : start + chunk]]
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise / np.sqrt(centres.shape[1]))
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, places


def build_rate(count: int, batch_size: int) -> None:
    rng = np.random.default_rng(0)
    pipe = PlaceRecognitionPipeline(model=vprhub.build_model("salad"))
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(count):
            paths.append(Path(folder) / f"{i:05d}.jpg")
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(paths[-1], quality=90)
        pipe.identity()  # not part of the rate
        index = build_index(pipe, paths, batch_size=batch_size, progress=False)
    report = index.build_report
    print(
        f"build: {report['indexed']} images (480x640 JPEG -> 224x224, tiny SALAD, D={index.dim}, "
        f"batch {batch_size}) in {report['seconds']:.2f} s = {report['images_per_second']:.1f} images/s"
    )


def timed_search(index: PlaceIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
    """Top-k ids and timings: median ms of one query at a time with 1 and with all faiss
    threads, and ms/query of the whole batch (all threads)."""
    threads = faiss.omp_get_max_threads()
    times = {}
    for name, count in (("one query, 1 thread", 1), (f"one query, {threads} threads", threads)):
        faiss.omp_set_num_threads(count)
        index.search(queries[:1], k)  # warm-up
        single = []
        for q in queries[:50]:
            start = time.perf_counter()
            index.search(q, k)
            single.append(time.perf_counter() - start)
        times[name] = float(np.median(single)) * 1e3
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    times[f"batch of {len(queries)}"] = (time.perf_counter() - start) / len(queries) * 1e3
    return ids, times


def _ms(times: dict[str, float]) -> str:
    return ", ".join(f"{v:.2f} ms ({k})" for k, v in times.items())


def search_figures(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((NUM_PLACES, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    start = time.perf_counter()
    database, db_places = clustered(rng, centres, args.entries)
    sources = rng.choice(args.entries, args.queries, replace=False)
    queries, _ = clustered(rng, database[sources], args.queries, noise=QUERY_NOISE)
    query_places = db_places[sources]
    print(f"data: {args.entries} x {args.dim} float32 ({database.nbytes / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - start:.1f} s; {args.queries} queries")

    flat = PlaceIndex(args.dim)
    start = time.perf_counter()
    flat.add(database)
    add_s = time.perf_counter() - start
    exact, times = timed_search(flat, queries, 10)
    print(f"flat:  add {add_s:.1f} s; query {_ms(times)}; exact nearest = revisited entry "
          f"{np.mean(exact[:, 0] == sources):.3f}, right place@1 "
          f"{np.mean(db_places[exact[:, 0]] == query_places):.3f}; peak RSS {peak_rss_gb():.1f} GiB")

    ivfpq = PlaceIndex(args.dim, index_type=args.ivfpq, search_params={"nprobe": args.nprobe})
    start = time.perf_counter()
    ivfpq.train(database[rng.choice(args.entries, min(args.train, args.entries), replace=False)])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ivfpq.add(database)
    add_s = time.perf_counter() - start
    code_bytes = int(args.ivfpq.split("PQ")[1].split("x")[0]) if "x" in args.ivfpq else None
    for nprobe in sorted({max(1, args.nprobe // 4), args.nprobe, args.nprobe * 4}):
        ivfpq.set_search_params(nprobe=nprobe)
        approx, times = timed_search(ivfpq, queries, 10)
        recall1 = float(np.mean(approx[:, 0] == exact[:, 0]))
        recall10 = float(np.mean([e in a for a, e in zip(approx, exact[:, 0])]))
        overlap10 = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
        place1 = float(np.mean(db_places[approx[:, 0]] == query_places))
        print(f"{ivfpq.factory} nprobe={nprobe}: query {_ms(times)}; recall@1 {recall1:.3f}, "
              f"recall@10 {recall10:.3f}, overlap@10 {overlap10:.3f} vs exact; right place@1 {place1:.3f}")
    print(f"{ivfpq.factory}: train on {min(args.train, args.entries)} in {train_s:.1f} s, add {add_s:.1f} s, "
          f"{code_bytes} B/vector codes vs {4 * args.dim} B flat")


def local_policy(args: argparse.Namespace) -> None:
    shape, k = (61, 61, 128), 100
    rng = np.random.default_rng(2)
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        store = LocalFeatureStore(shape)
        for start in range(0, args.local_maps, 250):
            n = min(250, args.local_maps - start)
            store.add(np.arange(start, start + n), rng.standard_normal((n, *shape), dtype=np.float32))
        store.save(Path(folder))
        size_gb = (Path(folder) / FEATURES_FILE).stat().st_size / 2**30
        del store
        cold, warm = [], []
        for _ in range(5):
            fd = os.open(Path(folder) / FEATURES_FILE, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict this file's pages
            os.close(fd)
            loaded = LocalFeatureStore.load(Path(folder))
            ids = np.sort(rng.choice(args.local_maps, k, replace=False))
            for times in (cold, warm):  # from disk, then from the page cache
                start = time.perf_counter()
                maps = loaded.get(ids)
                times.append(time.perf_counter() - start)
        print(f"local store: {args.local_maps} maps {shape} float16 = {size_gb:.2f} GiB on disk "
              f"({loaded.nbytes_per_entry / 1e6:.2f} MB/image); gathering K={k} candidates "
              f"({maps.nbytes / 1e6:.0f} MB): median {np.median(cold) * 1e3:.0f} ms from disk, "
              f"{np.median(warm) * 1e3:.0f} ms from the page cache")
    if args.recompute_model == "none":
        return
    if args.recompute_model == "large":
        from transformers import Dinov2Config

        backbone = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518)
        model = vprhub.SelaVPRModel(vprhub.SelaVPRConfig(backbone_config=backbone))
    else:
        model = vprhub.build_model("selavpr")
    model.eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(pixels[:1])
        start = time.perf_counter()
        model(pixels)
        per_image = (time.perf_counter() - start) / 2
    print(f"recompute: SelaVPR ({args.recompute_model}, 224x224) forward {per_image:.2f} s/image on "
          f"{torch.get_num_threads()} CPU threads -> {per_image * k:.0f} s per query for K={k} candidates")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=8448)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ivfpq", default="IVF512,PQ64x8np", help="faiss factory string of the IVF-PQ option")
    parser.add_argument("--train", type=int, default=20_000, help="training sample of the IVF-PQ index")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--build-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--local-maps", type=int, default=1000, help="maps in the local-feature store test")
    parser.add_argument("--recompute-model", default="large", choices=["large", "tiny", "none"])
    parser.add_argument("--tmp", default=None, help="folder for the local-feature store (default: system temp)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; faiss on CPU")
    build_rate(args.build_images, args.batch_size)
    search_figures(args)
    local_policy(args)


if __name__ == "__main__":
    main()
