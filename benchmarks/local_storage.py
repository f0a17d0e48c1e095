"""SelaVPR local features at scale: bytes per image and re-ranking time per storage option.

    python benchmarks/local_storage.py [--quick] [--model PATH] [--images 32] [--candidates 16]
                                       [--image-size 112] [--queries 10] [--threads 1]

For each of ``float16`` / ``int8`` (memory-mapped maps) and ``recompute`` (no maps; the K
candidates re-embedded from their image paths at query time), a map of ``--images`` synthetic
views is built with ``build_index(..., local_storage=...)``, saved and reopened; reported:
local-feature bytes per image (``local_features.npy`` + ``local_ids.npy`` over the entries),
median re-ranking time per query (global search + the candidates' maps + mutual-NN scoring;
the query's own embedding, the same for every option, excluded) and the largest change of a candidate's mutual-NN count against float16.
Also printed: bytes per image at the official SelaVPR map (61 x 61 x 128).

Default / ``--quick``: a randomly initialised tiny SelaVPR at 112 px (8 x 8 maps) on CPU;
``--model`` with a real SelaVPR checkpoint (and a GPU) gives representative recompute times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import vprhub
from vprhub.data.synthetic import SyntheticPlaces
from vprhub.pipelines import PlaceIndex, build_index
from vprhub.pipelines.local_store import LOCAL_STORAGES
from vprhub.pipelines.place_recognition import PlaceRecognitionPipeline, as_pipeline
from vprhub.pipelines.plan import local_feature_plan

OFFICIAL_MAP = (61, 61, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the defaults (tiny model, 32 images)")
    parser.add_argument("--model", help="SelaVPR model folder or hub id (default: a tiny random one)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model:
        pipe = as_pipeline(args.model)
    else:
        torch.manual_seed(0)
        size = [args.image_size, args.image_size]
        pipe = PlaceRecognitionPipeline(model=vprhub.build_model("selavpr", image_size=size))
    places = max(1, args.images // 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        database = SyntheticPlaces(num_places=places, views_per_place=2, image_size=96, seed=1).save_images(root / "db")
        queries = SyntheticPlaces(num_places=places, views_per_place=1, image_size=96, seed=1, first_view=5)
        queries = [str(q) for q in queries.save_images(root / "q")[: args.queries]]
        k = min(args.candidates, len(database))
        print(f"{len(database)} images, K = {k} candidates, {len(queries)} queries, device {pipe.device}")
        print(f"{'storage':<10} {'B/image':>9} {'B/image @61x61x128':>19} {'rerank ms/query':>16} {'max |d count|':>14}")
        official = {r["storage"]: r["bytes_per_image"] for r in local_feature_plan(1, OFFICIAL_MAP)}
        reference = None
        embedded = [
            {"descriptors": torch.from_numpy(out["descriptor"][None]), "local_features": torch.from_numpy(out["local_features"][None])}
            for out in pipe(queries, return_local_features=True)
        ]
        for storage in LOCAL_STORAGES:
            folder = root / f"{storage}.vprindex"
            build_index(pipe, database, batch_size=8, progress=False, local_storage=storage).save(folder)
            index = PlaceIndex.load(folder)
            stored = sum((folder / name).stat().st_size for name in ("local_features.npy", "local_ids.npy")
                         if (folder / name).exists())
            pipe.postprocess(embedded[0], index=index, top_k=k, rerank=True, rerank_candidates=k)  # warm-up
            times, scores = [], []
            for query in embedded:
                start = time.perf_counter()
                hits = pipe.postprocess(query, index=index, top_k=k, rerank=True, rerank_candidates=k)
                times.append(1000 * (time.perf_counter() - start))
                scores.append({h["index"]: h["rerank_score"] for h in hits})
            reference = reference or scores
            change = max(abs(s[i] - r[i]) for s, r in zip(scores, reference) for i in r)
            print(f"{storage:<10} {stored / len(index):>9.0f} {official[storage]:>19} "
                  f"{statistics.median(times):>16.1f} {change:>14.0f}")


if __name__ == "__main__":
    main()
