"""``vprhub demo``: the main job end to end, on a city the package generates itself.

1. generate a synthetic city (database and query views of the same places, UTM in file names);
2. train a tiny model with the multi-similarity loss and measure recall@K before and after;
3. build a persistent place index over the database through the ``place-recognition`` pipeline;
4. query it, print the matches and draw them (PNG).
"""

from __future__ import annotations

import argparse
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

from .data.synthetic import write_gmberton_benchmark
from .evaluation import read_geo_folder
from .factory import build_model
from .modeling.backbone import tiny_dinov2_config
from .pipelines import PlaceIndex, build_index, plot_matches
from .pipelines.index import PLACE_INDEX
from .training import DataArguments, ModelArguments, TrainArguments, train
from .utils import FolderKind, check_replaceable, holds_only

SPLIT = "test"
IMAGE_SIZE = 112  # pixels of the generated photos
MODEL_INPUT = 56  # pixels seen by the tiny model: a 4 x 4 patch grid keeps the CPU demo fast
DIFFICULTY = 0.5  # viewpoint, light and occluder strength of the generated views
DATABASE_VIEWS = 2  # database views per generated place
TOP_K = 3  # hits shown per query
MIN_PLACES = -(-TOP_K // DATABASE_VIEWS)  # enough database images for the top TOP_K
MARKER = "vprhub-demo.txt"  # written first into --out: what lets --overwrite recognise a demo folder
DEMO_FILES = re.compile(rf"{re.escape(MARKER)}|city|model|city\.vprindex|matches_p\d+\.png")
DEMO_FOLDER = FolderKind(
    f"a vprhub demo folder ({MARKER})",
    # demos before the marker are recognised by their index
    lambda path: ((path / MARKER).is_file() or PLACE_INDEX.recognise(path / "city.vprindex"))
    and holds_only(path, DEMO_FILES),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train, index, search and plot on generated data (CPU, < 2 min)")
    parser.add_argument("--out", default="vprhub-demo", help="folder for the generated city, model, index and plot")
    parser.add_argument("--model", default="salad", choices=("salad", "selavpr", "cricavpr", "megaloc"))
    parser.add_argument("--places", type=int, default=40, help="places in the generated city")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the tiny model")
    parser.add_argument("--queries", type=int, default=3, help="queries to show")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.set_defaults(func=run)


def _fresh_folder(path: Path, overwrite: bool) -> Path:
    check_replaceable(path, overwrite, DEMO_FOLDER)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("written by `vprhub demo`; `vprhub demo --overwrite` may replace this folder\n")
    return path


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any work and by the demo's own flag names, values the demo cannot run with."""
    if args.places < MIN_PLACES:
        raise ValueError(
            f"--places must be at least {MIN_PLACES} (the top {TOP_K} of {DATABASE_VIEWS} views per place are "
            f"shown), got {args.places}"
        )
    if args.steps < 0:
        raise ValueError(f"--steps must be 0 or positive, got {args.steps}")
    if not 1 <= args.queries <= args.places:
        raise ValueError(f"--queries must be between 1 and --places ({args.places}), got {args.queries}")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    _check_arguments(args)
    out = Path(args.out)
    existed = out.exists()
    _fresh_folder(out, args.overwrite)
    try:
        _run_demo(args, out)
    except BaseException:  # leave no half-made demo: the folder as it was (gone, or empty)
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir()
        raise
    print(f"done in {time.perf_counter() - start:.0f} s; everything is in {out}/")
    return 0


def _run_demo(args: argparse.Namespace, out: Path) -> None:
    print(f"[1/4] generating a city of {args.places} places ({DATABASE_VIEWS} database views + 1 query view each) ...")
    city = write_gmberton_benchmark(
        out / "city",
        num_places=args.places,
        database_views=DATABASE_VIEWS,
        query_views=1,
        image_size=IMAGE_SIZE,
        seed=7,
        difficulty=DIFFICULTY,
    )
    test_set = read_geo_folder(city / "images" / SPLIT, name="synthetic-city")
    print(f"      {len(test_set.database_paths)} database images, {len(test_set.query_paths)} queries -> {city}")

    print(f"[2/4] training a tiny {args.model} for {args.steps} steps on other synthetic places ...")
    torch.manual_seed(0)
    # A wider initialisation than transformers' 0.02 keeps a random tiny ViT off its collapsed start.
    model = build_model(args.model, backbone_config=tiny_dinov2_config(initializer_range=0.1))
    result = train(
        ModelArguments(model=args.model, backbone="tiny"),
        DataArguments(
            train_dataset="synthetic",
            eval_dataset=str(city / "images" / SPLIT),
            synthetic_places=600,
            synthetic_difficulty=DIFFICULTY,
            places_per_batch=8,
            images_per_place=4,
            image_size=[MODEL_INPUT, MODEL_INPUT],
            eval_image_size=[MODEL_INPUT, MODEL_INPUT],
            rand_augment_ops=0,
            num_workers=0,
        ),
        TrainArguments(
            output_dir=str(out / "model"),
            max_steps=args.steps,
            optimizer="adam",
            learning_rate=1e-3,
            weight_decay=0.0,
            lr_scheduler="constant",
            eval_on_start=True,
            eval_every_epochs=1000,  # before and after training only
            save_steps=0,
            report_to="none",
            disable_tqdm=True,
            seed=0,
        ),
        model=model,
    )
    evaluations = [entry["eval"] for entry in result.state.log_history if "eval" in entry]
    before, after = evaluations[0], result.eval_results
    for k in (1, 5, 10):
        print(f"      recall@{k}: {before[f'recall@{k}']:.3f} untrained -> {after[f'recall@{k}']:.3f} trained")

    print("[3/4] indexing the database through pipeline('place-recognition') ...")
    recognizer = pipeline("place-recognition", model=str(out / "model"))
    metadata = [{"utm": _utm(path)} for path in test_set.database_paths]
    index = build_index(recognizer, [str(p) for p in test_set.database_paths], metadata=metadata, progress=False)
    index.save(out / "city.vprindex")
    print(f"      {len(index)} database images indexed -> {out / 'city.vprindex'}")

    print(f"[4/4] searching {args.queries} queries (top {TOP_K}) ...")
    index = PlaceIndex.load(out / "city.vprindex")
    picks = np.linspace(0, len(test_set.query_paths) - 1, args.queries).round().astype(int)
    for query in picks:
        path = test_set.query_paths[query]
        hits = recognizer(str(path), index=index, top_k=TOP_K)
        correct = set(int(i) for i in test_set.positives[query])
        marks = ", ".join(f"#{h['index']} {h['score']:.3f}{' ok' if h['index'] in correct else ''}" for h in hits)
        png = plot_matches(str(path), hits, out / f"matches_{_place(path)}.png", ground_truth=correct)
        print(f"      query of place {_place(path)} -> {marks}; drawn in {png}")


def _utm(path: Path) -> list[float]:
    east, north = path.name.split("@")[1:3]
    return [float(east), float(north)]


def _place(path: Path) -> str:
    """The place id (``p000014``) in a generated image's name (``...@s7p000014v002@...``)."""
    return re.search(r"p\d+", path.name.split("@")[7]).group()
