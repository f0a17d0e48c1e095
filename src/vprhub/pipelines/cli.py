"""``vprhub index build`` and ``vprhub search``."""

from __future__ import annotations

import argparse
import csv
import json
import warnings
from pathlib import Path
from typing import Any

from ..export.hloc import add_index_export_command, add_pairs_arguments, write_search_pairs
from .index import INDEX_TYPES, PlaceIndex
from .place_recognition import DEFAULT_RERANK_CANDIDATES, as_pipeline


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
    build.add_argument("--batch-size", type=int, default=8, help="images per model batch (default 8)")
    build.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=build_command)
    add_index_export_command(actions)

    search = subparsers.add_parser("search", help="find the places seen in query images")
    search.add_argument("queries", nargs="+", type=Path, help="query images")
    search.add_argument("--index", required=True, type=Path, help="a .vprindex folder")
    search.add_argument("--model", help="model to embed the queries (default: the one recorded in the index)")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--rerank", action="store_true", help="re-rank by SelaVPR local features")
    search.add_argument("--rerank-candidates", type=int, default=DEFAULT_RERANK_CANDIDATES)
    search.add_argument("--batch-size", type=int, help="queries per model batch (default: the index's)")
    search.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--plot", type=Path, help="write a PNG of each query and its hits (NAME_<i>.png for several)")
    add_pairs_arguments(search)
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


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    files = sorted(
        p.resolve() for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts)
    )
    if not files:
        raise ValueError(f"no files in {folder}")
    return files


def build_command(args: argparse.Namespace) -> int:
    files = _files(args.images)
    rows = [{} for _ in files]
    if args.metadata is not None:
        table = _read_metadata(args.metadata, args.images)
        rows = [table.pop(f, {}) for f in files]
        if table:
            warnings.warn(f"{len(table)} metadata rows name no file of {args.images}, e.g. {next(iter(table))}")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    pipe = as_pipeline(args.model, **({"device": args.device} if args.device else {}))
    index = PlaceIndex.build(
        pipe, files, metadata=rows, batch_size=args.batch_size, index_type=args.index_type, progress=not args.quiet
    )
    index.build_report["image_root"] = str(args.images.resolve())  # hloc names are relative to it
    index.save(args.out, overwrite=args.overwrite)
    report = index.build_report
    print(
        f"indexed {report['indexed']} of {report['images']} files in {report['seconds']:.1f} s "
        f"({report['images_per_second']:.1f} images/s), {index.factory} index -> {args.out}"
    )
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['input']}: {skipped['error']}")
    return 0


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
    pipe = as_pipeline(model, **({"device": args.device} if args.device else {}))
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
            plot_matches(query, hits, args.plot.with_name(name))
    for hits in results:
        for hit in hits:
            hit.pop("correspondences", None)
    if args.pairs is not None:
        write_search_pairs(args, index, results)
    if args.json:
        print(json.dumps([{"query": str(q), "hits": h} for q, h in zip(args.queries, results)], indent=1))
    else:
        print("\n\n".join(_table(q, h) for q, h in zip(args.queries, results)))
    return 0
