"""vprhub eval: recall@1/5/10 of a saved model on one or several benchmarks.

``--protocol NAME`` pins the data, the positive rule, the image size, the batch size and the
precision (see ``vprhub eval --list-protocols``); they are written into the JSON next to the recalls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..loading import check_device, check_model_type, load_model_and_processor
from ..utils import FileKind, atomic_write_file, check_replaceable_file, opening_source
from .benchmarks import KNOWN_BENCHMARKS, load_test_set
from .evaluator import DEFAULT_RERANK_NUM, evaluate_model
from .protocols import PROTOCOLS, describe, get_protocol, protocols_table, settings_for
from .recall import DEFAULT_K_VALUES
from .testset import DEFAULT_POSITIVE_RADIUS

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BATCH_SIZE = 32
RESULTS_FORMAT = "vprhub-eval-results"  # the mark of a results file that vprhub eval wrote
RESULTS_FORMAT_VERSION = 1
MAX_RESULTS_BYTES = 1 << 24


def _is_results_file(path: Path) -> bool:
    if path.stat().st_size > MAX_RESULTS_BYTES:
        return False
    try:
        report = json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(report, dict) and report.get("format") == RESULTS_FORMAT


RESULTS_FILE = FileKind(f"a vprhub eval results file (JSON with \"format\": \"{RESULTS_FORMAT}\")", _is_results_file)
PINNED = {"--image-size": "image_size", "--batch-size": "batch_size", "--dtype": "dtype", "--radius": "radius"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval",
        help="recall@K of a model on VPR benchmarks",
        description=__doc__,
    )
    parser.add_argument("--model", help="save_pretrained folder or Hub id of a vprhub model")
    parser.add_argument(
        "--dataset",
        nargs="+",
        help=f"benchmark names under --root ({', '.join(KNOWN_BENCHMARKS)}, or <name>_<split>) or dataset "
        "folders (database/ + queries/ with @UTM file names, a dataset folder holding images/test/, an MSLS "
        "root, or a *_dbImages.npy list)",
    )
    parser.add_argument(
        "--protocol",
        nargs="+",
        choices=list(PROTOCOLS),
        metavar="NAME",
        help="named protocols under --root, each pinning data, positives, image size, batch size and precision",
    )
    parser.add_argument("--list-protocols", action="store_true", help="print the protocols and their sources")
    parser.add_argument("--root", help="data root holding the benchmarks named by --dataset or --protocol")
    parser.add_argument(
        "--image-size", type=int, nargs="+", metavar="PX", help="evaluation size H [W]; default: the image processor's"
    )
    parser.add_argument(
        "--batch-size", type=int, help=f"images per forward pass, in file order (default {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--device", default=None, help="torch device; default cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype (default float32: none)")
    parser.add_argument("--rerank", action="store_true", help="re-rank with local features (SelaVPR)")
    parser.add_argument(
        "--rerank-num", type=int, default=DEFAULT_RERANK_NUM, help="candidates re-ranked per query (default 100)"
    )
    parser.add_argument(
        "--radius",
        type=float,
        help="positive radius in metres (default 25; the .npy lists carry their own positives)",
    )
    parser.add_argument("--json", dest="json_path", help="write the results to this JSON file (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a --json results file that vprhub wrote")
    parser.add_argument("--cache-dir", help="keep extracted descriptors here and reuse them")
    parser.add_argument("--num-workers", type=int, default=0, help="image loading worker processes (default 0)")
    parser.add_argument(
        "--quiet", "--no-progress", dest="quiet", action="store_true", help="hide the progress bars (alias --no-progress)"
    )
    parser.set_defaults(func=run)


def _image_size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--image-size takes one or two positive sizes (H [W]), got {values}")
    return (values[0], values[-1])


def load_model(path: str, image_size: tuple[int, int] | None = None):
    """The model and image processor of ``path`` (:func:`vprhub.loading.load_model_and_processor`),
    the processor resized to ``image_size``."""
    overrides = {} if image_size is None else {"size": {"height": image_size[0], "width": image_size[1]}}
    return load_model_and_processor(path, "--model", **overrides)


def format_table(results: list[dict], k_values=DEFAULT_K_VALUES) -> str:
    """A text table: one row per dataset, recalls in percent.

    ``evaluated``: queries scored (unreadable ones are skipped, outside the recalls);
    ``skipped``: unreadable images, queries and database (a skipped database image is never retrieved);
    ``no-positive``: evaluated queries without any positive (they count as misses);
    ``excluded``: queries the layout's protocol leaves out (MSLS: no positive).
    """
    header = ["dataset", "queries", "evaluated", "database", "skipped", "no-positive", "excluded"]
    header += [f"R@{k}" for k in k_values] + ["seconds"]
    rows = [
        [r["dataset"], str(r["num_queries"]), str(r["evaluated_queries"]), str(r["num_database"])]
        + [str(len(r["skipped_queries"]) + len(r["skipped_database"])), str(r["queries_without_positives"])]
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


def _report_skipped(result: dict) -> None:
    """One stderr line per side with unreadable images: how many, and which."""
    for side, evaluated in (("queries", "not evaluated"), ("database", "never retrieved")):
        names = result[f"skipped_{side}"]
        if names:
            print(
                f"{result['dataset']}: skipped {len(names)} unreadable {side} images ({evaluated}): {', '.join(names)}",
                file=sys.stderr,
            )


def _protocol_runs(args: argparse.Namespace, model_type: str) -> list[tuple]:
    """(test set, batch size, precision, protocol, settings) per protocol, then per dataset (no protocol)."""
    runs = []
    for name in args.protocol or []:
        if args.root is None:
            raise ValueError(f"--protocol {name} needs --root, the folder holding the benchmarks")
        protocol = get_protocol(name)
        settings = settings_for(protocol, model_type)
        runs.append((protocol.load(args.root), settings.batch_size, settings.precision, protocol, settings))
    radius = DEFAULT_POSITIVE_RADIUS if args.radius is None else args.radius
    for dataset in args.dataset or []:
        test_set = load_test_set(dataset, args.root, radius)
        runs.append((test_set, args.batch_size or DEFAULT_BATCH_SIZE, args.dtype or "float32", None, None))
    return runs


def _pinned_image_size(args: argparse.Namespace, model_type: str) -> tuple[int, int] | None:
    given = [flag for flag, attribute in PINNED.items() if getattr(args, attribute) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --protocol, which pins them")
    return settings_for(get_protocol(args.protocol[0]), model_type).image_size  # one size per model type


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on every protocol and dataset; print a table, optionally write JSON."""
    if args.list_protocols:
        print(protocols_table())
        return 0
    if args.model is None or not (args.dataset or args.protocol):
        raise ValueError("give --model and at least one --dataset or --protocol (or --list-protocols)")
    if args.json_path:
        check_replaceable_file(args.json_path, args.overwrite, RESULTS_FILE)
    for name, value in (("--batch-size", args.batch_size), ("--rerank-num", args.rerank_num)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    check_device(args.device)
    image_size = _image_size(args.image_size)
    model_type = _model_type(args.model) if args.protocol else None
    if args.protocol:
        image_size = _pinned_image_size(args, model_type)
    runs = _protocol_runs(args, model_type)
    model, image_processor = load_model(args.model, image_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = image_processor.size
    results = []
    for test_set, batch_size, dtype, protocol, settings in runs:
        result = evaluate_model(
            model,
            image_processor,
            test_set,
            batch_size=batch_size,
            device=device,
            dtype=DTYPES[dtype],
            rerank=args.rerank,
            rerank_num=args.rerank_num,
            cache_dir=args.cache_dir,
            num_workers=args.num_workers,
            progress=not args.quiet,
        )
        result.update(batch_size=batch_size, precision=dtype)
        if protocol is not None:
            result["protocol"] = describe(protocol, settings, (size["height"], size["width"]))
        results.append(result)
    print(format_table(results))
    for result in results:
        _report_skipped(result)
    if args.json_path:
        report = {
            "format": RESULTS_FORMAT,
            "format_version": RESULTS_FORMAT_VERSION,
            "model": args.model,
            "image_size": [size["height"], size["width"]],
            "rerank": args.rerank,
            "datasets": {r["dataset"]: r for r in results},
        }
        with atomic_write_file(args.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"results written to {args.json_path}", file=sys.stderr)
    return 0


def _model_type(path: str) -> str:
    with opening_source(path, "--model") as source:
        return check_model_type(source, f"--model {path}")
