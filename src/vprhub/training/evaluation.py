"""Recall@K during training: the evaluation set, and descriptor extraction spread over processes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..data.synthetic import write_gmberton_benchmark
from ..descriptor_store import Shard
from ..embedding import Embedder, precision_of
from ..evaluation import VPRTestSet, load_test_set, recalls_from_predictions
from ..evaluation.extract import assemble_descriptors
from ..evaluation.recall import search_readable
from ..utils import opening_source

K_VALUES = (1, 5, 10)
# A synthetic evaluation set never shares scenes with the synthetic training set of the same seed.
SYNTHETIC_EVAL_SEED_OFFSET = 10_000


def load_eval_set(
    spec: str,
    workdir: str | os.PathLike,
    root: str | None = None,
    radius: float = 25.0,
    synthetic_places: int = 50,
    image_size: tuple[int, int] = (224, 224),
    seed: int = 0,
    difficulty: float = 1.0,
) -> VPRTestSet:
    """The evaluation set named by ``--eval_dataset``.

    ``"synthetic"`` writes ``synthetic_places`` places (one database and one query view each,
    scenes unrelated to a synthetic training set of the same ``seed``) under ``workdir``; a
    path or a benchmark name under ``root`` goes to ``vprhub.evaluation.load_test_set``; any
    other string is a Hub dataset id, downloaded and read the same way (its
    ``images/test`` folder when it has one).
    """
    if spec == "synthetic":
        seed += SYNTHETIC_EVAL_SEED_OFFSET
        folder = (
            Path(workdir) / f"synthetic-eval-{seed}-{synthetic_places}-{image_size[0]}x{image_size[1]}-{difficulty}"
        )
        if not folder.is_dir():
            write_gmberton_benchmark(
                folder, synthetic_places, image_size=tuple(image_size), seed=seed, difficulty=difficulty
            )
        return _renamed(load_test_set(folder / "images" / "test", radius=radius), f"synthetic(seed={seed})")
    if root is not None or Path(spec).expanduser().exists():
        return load_test_set(spec, root, radius)
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--eval_dataset {spec}: no such folder, and not a Hub dataset id (owner/name)")
    from huggingface_hub import snapshot_download

    with opening_source(spec, "--eval_dataset") as repo_id:
        local = Path(snapshot_download(repo_id, repo_type="dataset"))
    folder = local / "images" / "test" if (local / "images" / "test").is_dir() else local
    return _renamed(load_test_set(folder, radius=radius), spec)


def _renamed(test_set: VPRTestSet, name: str) -> VPRTestSet:
    return VPRTestSet(
        name, test_set.database_paths, test_set.query_paths, test_set.positives, test_set.excluded_queries
    )


_AUTOCAST = {"bf16": "autocast-bfloat16", "fp16": "autocast-float16"}


def extract(
    accelerator: Accelerator,
    model: torch.nn.Module,
    paths,
    image_processor,
    batch_size: int,
    num_workers: int,
    skipped: list | None = None,
) -> np.ndarray:
    """Descriptors ``[N, D]`` of ``paths`` in order, through the embedding engine.

    Batches are consecutive runs of ``batch_size`` images exactly as in a single-process
    evaluation (this matters for CricaVPR, whose descriptors depend on the batch): batch
    ``i`` is embedded by process ``i % num_processes`` and the results are gathered in order.
    Autocast follows the accelerator's mixed precision, else the weights' own dtype (never
    cast: they are being trained); unreadable images are zero vectors, listed in ``skipped`` when given.
    """
    model = accelerator.unwrap_model(model)
    engine = Embedder(
        model,
        image_processor,
        device=accelerator.device,
        precision=_AUTOCAST.get(accelerator.mixed_precision) or precision_of(model),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    shards = engine.stream(
        paths,
        shard_size=batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        progress=False,
    )
    gathered = gather_object([(s.index, s.rows, s.descriptors, s.skipped) for s in shards])
    ordered = [Shard(i, rows, d, skipped=skipped) for i, rows, d, skipped in sorted(gathered, key=lambda x: x[0])]
    return assemble_descriptors(ordered, len(paths), skipped=skipped)


def evaluate_recall(
    accelerator: Accelerator,
    model: torch.nn.Module,
    test_set: VPRTestSet,
    image_processor,
    batch_size: int = 16,
    num_workers: int = 0,
) -> dict:
    """Recall@1/5/10 (fractions) of ``model`` on ``test_set``, plus the dataset name and sizes.

    An unreadable query is not evaluated (recalls are fractions of ``evaluated_queries``), an
    unreadable database image is never retrieved.
    """
    was_training = model.training
    model.eval()
    skipped_database: list[dict] = []
    skipped_queries: list[dict] = []
    try:
        database = extract(
            accelerator, model, test_set.database_paths, image_processor, batch_size, num_workers, skipped_database
        )
        queries = extract(
            accelerator, model, test_set.query_paths, image_processor, batch_size, num_workers, skipped_queries
        )
    finally:
        model.train(was_training)
    predictions, query_rows = search_readable(
        database,
        queries,
        max(K_VALUES),
        skipped_database=[item["index"] for item in skipped_database],
        skipped_queries=[item["index"] for item in skipped_queries],
    )
    recalls = recalls_from_predictions(predictions, [test_set.positives[i] for i in query_rows], K_VALUES)
    return {
        "dataset": test_set.name,
        **{f"recall@{k}": value for k, value in recalls.items()},
        "num_database": test_set.num_database,
        "num_queries": test_set.num_queries,
        "evaluated_queries": len(query_rows),
        "skipped_database": len(skipped_database),
    }
