"""``vprhub index build`` and ``vprhub search``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from ..embedding import PRECISIONS
from ..image_io import list_image_files
from ..utils import check_replaceable, opening_source
from .index import INDEX_TYPES, PLACE_INDEX, PlaceIndex
from .place_recognition import DEFAULT_RERANK_CANDIDATES, as_pipeline


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` (with ``build``) and ``search`` sub-commands."""
    index = subparsers.add_parser("index", help="build a place index from a folder of images")
    actions = index.add_subparsers(dest="index_command", required=True)
    build = actions.add_parser("build", help="embed every file of a folder and write a .vprindex")
    build.add_argument("--model", required=True, help="model folder or hub id")
    build.add_argument("--images", required=True, type=Path, help="folder of database images (searched recursively)")
    build.add_argument("--out", required=True, type=Path, help="index folder to write, e.g. map.vprindex")
    build.add_argument("--metadata", type=Path, help="CSV with a 'path' column (relative to --images) and any others")
    build.add_argument(
        "--index-type", default="flat", help=f"one of {', '.join(INDEX_TYPES)} or a faiss factory string"
    )
    build.add_argument("--batch-size", type=positive_int, default=8, help="images per model batch (default 8)")
    build.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    build.add_argument("--precision", choices=PRECISIONS, help="model precision (default: float32, the parity mode)")
    build.add_argument("--num-workers", type=int, help="image decoding processes (default: one per core)")
    build.add_argument(
        "--store",
        type=Path,
        help="descriptor store folder to keep (a killed build run again with it resumes); "
        "default: a hidden folder beside --out, removed once the index is written",
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=build_command)

    search = subparsers.add_parser("search", help="find the places seen in query images")
    search.add_argument("queries", nargs="+", type=Path, help="query images")
    search.add_argument("--index", required=True, type=Path, help="a .vprindex folder")
    search.add_argument("--model", help="model to embed the queries (default: the one recorded in the index)")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--rerank", action="store_true", help="re-rank by SelaVPR local features")
    search.add_argument("--rerank-candidates", type=int, default=DEFAULT_RERANK_CANDIDATES)
    search.add_argument("--batch-size", type=positive_int, help="queries per model batch (default: the index's)")
    search.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--plot", type=Path, help="write a PNG of each query and its hits (NAME_<i>.png for several)")
    search.set_defaults(func=search_command)


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _read_metadata(csv_path: Path, root: Path) -> dict[Path, dict]:
    """CSV rows keyed by resolved image path; numbers become numbers."""
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path} needs a 'path' column, got columns {reader.fieldnames}")
        rows = list(reader)
    return {
        (root / row["path"]).resolve(): {k: _parse_value(v) for k, v in row.items() if k != "path"}
        for row in rows
    }


def build_command(args: argparse.Namespace) -> int:
    """Embed the folder (resumably, shared among ``accelerate launch`` processes), then index it."""
    from accelerate import PartialState

    from .build import database_embedder, index_from_shards

    files = [p.resolve() for p in list_image_files(args.images)]
    if not files:
        raise ValueError(f"no files in {args.images}")
    rows = [{} for _ in files]
    if args.metadata is not None:
        table = _read_metadata(args.metadata, args.images)
        rows = [table.pop(f, {}) for f in files]
        if table:
            warnings.warn(f"{len(table)} metadata rows name no file of {args.images}, e.g. {next(iter(table))}")
    inputs = [args.images] + ([args.metadata] if args.metadata is not None else [])
    check_replaceable(args.out, args.overwrite, PLACE_INDEX, inputs)
    # under `accelerate launch` each process embeds its share of the store; alone, no process group
    state = PartialState(cpu=args.device == "cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, processes = (state.process_index, state.num_processes) if state else (0, 1)
    device = args.device or (str(state.device) if state else None)
    with opening_source(args.model, "--model") as source:
        pipe = as_pipeline(source, **({"device": device} if device else {}))
    engine = database_embedder(pipe, args.batch_size, args.precision, args.num_workers)
    store_path = args.store or args.out.with_name(f".{args.out.name}.embeddings")
    if args.store is None and rank == 0 and _stale_store(store_path, engine, files, pipe.produces_local_features):
        shutil.rmtree(store_path)  # our own leftover of other inputs or settings: start afresh
    if state is not None:
        state.wait_for_everyone()
    store = engine.embed_to_store(
        files,
        store_path,
        local_features=pipe.produces_local_features,
        process_index=rank,
        num_processes=processes,
        progress=not args.quiet and (state is None or state.is_local_main_process),
        desc="indexing",
    )
    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return 0
    index = index_from_shards(store.shards(), files, rows, engine, args.index_type)
    report = index.build_report
    report.update(seconds=engine.report.seconds, images_per_second=engine.report.images_per_second)
    index.save(args.out, overwrite=args.overwrite)
    if args.store is None:
        shutil.rmtree(store_path, ignore_errors=True)
    resumed = len(files) - engine.report.images
    print(
        f"indexed {report['indexed']} of {report['images']} files in {report['seconds']:.1f} s "
        f"({report['images_per_second']:.1f} images/s"
        + (f", {resumed} from the store" if resumed else "")
        + f"), {index.factory} index -> {args.out}"
    )
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['input']}: {skipped['error']}")
    return 0


def _stale_store(path: Path, engine: Any, files: list[Path], local_features: bool) -> bool:
    """True when ``path`` is a descriptor store vprhub left for other inputs or settings."""
    from ..descriptor_store import DescriptorStore

    try:
        store = DescriptorStore.open(path)
    except ValueError:
        return False
    return store.manifest["key"] != json.loads(json.dumps(engine.store_key(files, local_features), default=str))


def _table(query: Path, hits: list[dict]) -> str:
    rerank = any("rerank_score" in h for h in hits)
    head = f"{'rank':>4}  {'id':>8}  {'score':>8}" + ("  {:>6}".format("mnn") if rerank else "") + "  metadata"
    lines = [f"query {query}", head]
    for rank, hit in enumerate(hits, 1):
        meta = ", ".join(f"{k}={v}" for k, v in hit["metadata"].items())
        mnn = f"  {hit['rerank_score']:>6.0f}" if rerank else ""
        lines.append(f"{rank:>4}  {hit['index']:>8}  {hit['score']:>8.4f}{mnn}  {meta}")
    return "\n".join(lines)


def search_command(args: argparse.Namespace) -> int:
    index = PlaceIndex.load(args.index)
    model = args.model or (index.identity or {}).get("name_or_path")
    if model is None:
        raise ValueError(f"{args.index} records no model path: pass --model")
    if not args.model and not Path(model).is_absolute() and (args.index.parent / model).is_dir():
        model = args.index.parent / model  # older indexes recorded the path as typed, beside the index
    with opening_source(model, "--model" if args.model else f"the model recorded in {args.index}") as source:
        pipe = as_pipeline(source, **({"device": args.device} if args.device else {}))
    kwargs = dict(index=index, top_k=args.top_k)
    if args.rerank:
        kwargs.update(rerank=True, rerank_candidates=args.rerank_candidates, return_correspondences=bool(args.plot))
    if args.batch_size is not None:
        kwargs["batch_size"] = args.batch_size
    results = pipe([str(q) for q in args.queries], **kwargs)
    if args.plot is not None:
        from .plotting import plot_matches

        for i, (query, hits) in enumerate(zip(args.queries, results)):
            name = args.plot.name if len(args.queries) == 1 else f"{args.plot.stem}_{i}{args.plot.suffix}"
            written = plot_matches(query, hits, args.plot.with_name(name))
            print(f"plot of {query}: {written}", file=sys.stderr)
    for hits in results:
        for hit in hits:
            hit.pop("correspondences", None)
    if args.json:
        print(json.dumps([{"query": str(q), "hits": h} for q, h in zip(args.queries, results)], indent=1))
    else:
        print("\n\n".join(_table(q, h) for q, h in zip(args.queries, results)))
    return 0
