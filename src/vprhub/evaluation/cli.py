"""vprhub eval: recall@1/5/10 of a saved model on one or several benchmarks."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import AutoImageProcessor, AutoModel

from ..utils import atomic_write_file, opening_source
from .benchmarks import KNOWN_BENCHMARKS, load_test_set
from .evaluator import DEFAULT_RERANK_NUM, evaluate_model
from .recall import DEFAULT_K_VALUES
from .testset import DEFAULT_POSITIVE_RADIUS

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="recall@K of a model on VPR benchmarks",
        description=__doc__,
    )
    parser.add_argument("--model", required=True, help="save_pretrained folder or Hub id of a vprhub model")
    parser.add_argument(
        "--dataset",
        nargs="+",
        required=True,
        help=f"benchmark names under --root ({', '.join(KNOWN_BENCHMARKS)}, or <name>_<split>) or dataset "
        "folders (database/ + queries/ with @UTM file names, an MSLS root, or a *_dbImages.npy list)",
    )
    parser.add_argument("--root", help="data root holding the benchmarks named by --dataset")
    parser.add_argument(
        "--image-size", type=int, nargs="+", metavar="PX", help="evaluation size H [W]; default: the image processor's"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass, in file order (default 32)"
    )
    parser.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype (default float32: none)"
    )
    parser.add_argument("--rerank", action="store_true", help="re-rank with local features (SelaVPR)")
    parser.add_argument(
        "--rerank-num", type=int, default=DEFAULT_RERANK_NUM, help="candidates re-ranked per query (default 100)"
    )
    parser.add_argument(
        "--radius",
        type=float,
        default=DEFAULT_POSITIVE_RADIUS,
        help="positive radius in metres (default 25; the .npy lists carry their own positives)",
    )
    parser.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    parser.add_argument("--cache-dir", help="keep extracted descriptors here and reuse them")
    parser.add_argument("--num-workers", type=int, default=0, help="image loading worker processes (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def _image_size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--image-size takes one or two positive sizes (H [W]), got {values}")
    return (values[0], values[-1])


def load_model(path: str, image_size: tuple[int, int] | None = None):
    """``AutoModel`` and ``AutoImageProcessor`` from ``path``, the processor resized to ``image_size``."""
    overrides = {} if image_size is None else {"size": {"height": image_size[0], "width": image_size[1]}}
    with opening_source(path, "model") as source:
        model = AutoModel.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source, **overrides)
    return model, image_processor


def format_table(results: list[dict], k_values=DEFAULT_K_VALUES) -> str:
    """A text table: one row per dataset, recalls in percent.

    ``no-positive``: evaluated queries without any positive (they count as misses);
    ``excluded``: queries the layout's protocol leaves out (MSLS: no positive).
    """
    header = ["dataset", "queries", "database", "no-positive", "excluded"] + [f"R@{k}" for k in k_values]
    header.append("seconds")
    rows = [
        [r["dataset"], str(r["num_queries"]), str(r["num_database"]), str(r["queries_without_positives"])]
        + [str(r["excluded_queries"])]
        + [f"{100 * r[f'recall@{k}']:.2f}" for k in k_values]
        + [f"{r['seconds']:.1f}"]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on every ``args.dataset``; print a table, optionally write JSON."""
    image_size = _image_size(args.image_size)
    for name, value in (("--batch-size", args.batch_size), ("--rerank-num", args.rerank_num)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    test_sets = [load_test_set(dataset, args.root, args.radius) for dataset in args.dataset]
    model, image_processor = load_model(args.model, image_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = image_processor.size
    results = []
    for test_set in test_sets:
        results.append(
            evaluate_model(
                model,
                image_processor,
                test_set,
                batch_size=args.batch_size,
                device=device,
                dtype=DTYPES[args.dtype],
                rerank=args.rerank,
                rerank_num=args.rerank_num,
                cache_dir=args.cache_dir,
                num_workers=args.num_workers,
                progress=not args.no_progress,
            )
        )
    print(format_table(results))
    for result in results:
        if result["skipped_images"]:
            names = ", ".join(result["skipped_images"])
            print(f"{result['dataset']}: skipped {len(result['skipped_images'])} unreadable images: {names}", file=sys.stderr)
    if args.json_path:
        report = {
            "model": args.model,
            "image_size": [size["height"], size["width"]],
            "batch_size": args.batch_size,
            "rerank": args.rerank,
            "datasets": {r["dataset"]: r for r in results},
        }
        with atomic_write_file(args.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"results written to {args.json_path}", file=sys.stderr)
    return 0
