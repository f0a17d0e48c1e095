"""``vprhub index build`` and ``vprhub search``."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..embedding import PRECISIONS
from ..export.hloc import PAIRS_FILE, add_index_export_command, add_pairs_arguments, write_search_pairs
from ..image_io import list_image_files
from ..loading import check_device, load_index_model, load_model
from ..utils import check_replaceable, check_replaceable_file, temporary_stem
from .backends import BACKENDS
from .backends.milvus import DEFAULT_COLLECTION, MilvusStore
from .build import build_index
from .compression import COMPRESSIONS
from .index import FORMAT, INDEX_TYPES, LATLON_KEYS, PLACE_INDEX, PlaceIndex, factory_string
from .local_store import LOCAL_STORAGES
from .place_recognition import DEFAULT_RERANK_CANDIDATES, as_pipeline

NUMERIC_COLUMNS = ("lat", "lon", "utm_east", "utm_north")
MILVUS_CHUNK = 1024  # images embedded and written to Milvus at a time (a killed build loses at most one chunk)


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
    build.add_argument("--out", type=Path, help="index folder to write, e.g. map.vprindex (faiss backend)")
    build.add_argument("--backend", choices=BACKENDS, default="faiss", help="faiss (a folder, default) or milvus")
    build.add_argument("--uri", help="Milvus URI: a milvus-lite file (map.db) or http://host:19530")
    build.add_argument("--collection", default=DEFAULT_COLLECTION, help="Milvus collection (default: places)")
    build.add_argument("--metadata", type=Path, help="CSV with a 'path' column (relative to --images) and any others")
    build.add_argument(
        "--numeric-columns",
        default=",".join(NUMERIC_COLUMNS),
        help="CSV columns read as numbers (others stay strings, '02134' included); default: %(default)s",
    )
    build.add_argument(
        "--index-type", default="flat", help=f"one of {', '.join(INDEX_TYPES)} or a faiss factory string"
    )
    build.add_argument("--compress", help=f"compressed storage (faiss): {', '.join(COMPRESSIONS)}")
    build.add_argument(
        "--local-features",
        choices=LOCAL_STORAGES,
        default="float16",
        help="SelaVPR local features: stored float16 or int8 maps, or recompute the candidates' maps when re-ranking",
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
    add_index_export_command(actions)

    planner = actions.add_parser("plan", help="memory, disk and recall retention of a map per storage option")
    planner.add_argument("--images", required=True, type=int, help="number of database images")
    planner.add_argument("--model", help="model folder or hub id (gives the descriptor width)")
    planner.add_argument("--dim", type=int, help="descriptor width, instead of --model")
    planner.add_argument("--compress", action="append", help=f"option(s) to plan (repeatable): {', '.join(COMPRESSIONS)}")
    planner.add_argument(
        "--local-features", action="store_true", help="include SelaVPR local features and their storage options (needs --model)"
    )
    planner.add_argument(
        "--dataset", type=Path, help="measure recall retention on this evaluation dataset (needs --model)"
    )
    planner.add_argument("--json", action="store_true", help="print JSON")
    planner.set_defaults(func=plan_command)

    search = subparsers.add_parser("search", help="find the places seen in query images")
    search.add_argument("queries", nargs="+", type=Path, help="query images")
    search.add_argument("--index", required=True, help="a .vprindex folder or a Milvus URI (map.db, http://host:19530)")
    search.add_argument("--collection", default=DEFAULT_COLLECTION, help="Milvus collection (default: places)")
    search.add_argument("--near", type=_pair, help="LAT,LON (or EAST,NORTH with --coordinate-keys): search near it")
    search.add_argument("--radius-m", type=float, help="with --near: keep entries within this many metres")
    search.add_argument(
        "--coordinate-keys", type=_keys, default=LATLON_KEYS, help="metadata keys of the position (default: lat,lon)"
    )
    search.add_argument("--where", action="append", type=_condition, default=[],
                        help="KEY=VALUE metadata filter (repeatable; VALUE is JSON if it parses, else a string)")
    search.add_argument("--model", help="model to embed the queries (default: the one recorded in the index)")
    search.add_argument("--top-k", type=int, default=5, help="hits per query (default 5; at most the map's size)")
    search.add_argument("--rerank", action="store_true", help="re-rank by SelaVPR local features")
    search.add_argument(
        "--rerank-candidates", type=int, default=DEFAULT_RERANK_CANDIDATES,
        help=f"global candidates re-ranked by local features (default {DEFAULT_RERANK_CANDIDATES})",
    )
    search.add_argument("--batch-size", type=positive_int, help="queries per model batch (default: the index's)")
    search.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--plot", type=Path, help="write a PNG of each query and its hits (NAME_<i>.png for several)")
    add_pairs_arguments(search)
    search.add_argument(
        "--overwrite", action="store_true", help="replace --plot / --pairs files that vprhub wrote (never other files)"
    )
    search.set_defaults(func=search_command)


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers A,B, got {text!r}") from None
    return a, b


def _keys(text: str) -> tuple[str, str]:
    keys = tuple(k.strip() for k in text.split(","))
    if len(keys) != 2 or not all(keys):
        raise argparse.ArgumentTypeError(f"expected two metadata keys A,B, got {text!r}")
    return keys


def _condition(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _number(text: str, where: str) -> float | int | None:
    if text.strip() == "":
        return None
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not a number (the column is declared numeric)") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {text!r} is not a finite number; leave the cell empty for a missing value")
    return value


def _csv_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The columns and ``(line, row)`` pairs of a UTF-8 CSV (an Excel byte-order mark is fine);
    a malformed file raises ``ValueError`` naming it and the line."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, strict=True)
            rows, line = [], 1  # the line each record starts on
            try:
                columns = reader.fieldnames or []
                line = reader.line_num + 1
                for row in reader:
                    rows.append((line, row))
                    line = reader.line_num + 1
            except csv.Error as err:
                raise ValueError(f"{csv_path} line {line}: malformed CSV ({err})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"--metadata {csv_path} not found") from None
    except IsADirectoryError:
        raise ValueError(f"--metadata {csv_path} is a folder, not a CSV file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{csv_path} is not UTF-8 text ({err}); save it as UTF-8 CSV") from None
    unnamed = [number for number, column in enumerate(columns, 1) if not column.strip()]
    if unnamed:
        raise ValueError(f"{csv_path}: column {unnamed[0]} has no name; name every column")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"{csv_path}: columns {repeated} appear more than once; name each column once")
    if "path" not in columns:
        raise ValueError(f"{csv_path} needs a 'path' column, got columns {columns}")
    for line, row in rows:
        if None in row:
            raise ValueError(f"{csv_path} line {line}: more cells than columns")
        if None in row.values():
            raise ValueError(f"{csv_path} line {line}: fewer cells than the {len(columns)} columns")
    return columns, rows


def _read_metadata(csv_path: Path, root: Path, numeric: tuple[str, ...] = NUMERIC_COLUMNS) -> dict[Path, dict]:
    """CSV rows keyed by absolute image path: strings stay strings, ``numeric`` columns become
    numbers (an empty cell: null); a path listed twice is an error."""
    _, rows = _csv_rows(csv_path)
    table: dict[Path, dict] = {}
    first_line: dict[Path, int] = {}
    for line, row in rows:
        path = Path(os.path.abspath(root / row["path"]))
        if path in table:
            raise ValueError(
                f"{csv_path}: {row['path']!r} is listed twice (lines {first_line[path]} and {line}); keep one row"
            )
        table[path] = {
            k: _number(v, f"{csv_path} line {line}, column {k!r}") if k in numeric else v
            for k, v in row.items()
            if k != "path"
        }
        first_line[path] = line
    return table


def _metadata_rows(args: argparse.Namespace, files: list[Path]) -> list[dict]:
    """The ``--metadata`` row of each file (``{}`` without one); no row naming any file is an error."""
    if args.metadata is None:
        return [{} for _ in files]
    numeric = tuple(c.strip() for c in args.numeric_columns.split(",") if c.strip())
    table = _read_metadata(args.metadata, args.images, numeric)
    rows = [table.pop(f, {}) for f in files]
    if table and not any(rows):
        raise ValueError(
            f"no row of {args.metadata} names a file of {args.images} (e.g. {next(iter(table))}); "
            "its 'path' column must be relative to --images"
        )
    if table:
        warnings.warn(f"{len(table)} metadata rows name no file of {args.images}, e.g. {next(iter(table))}")
    return rows


def build_command(args: argparse.Namespace) -> int:
    """Embed the folder (resumably, shared among ``accelerate launch`` processes), then index it."""
    from accelerate import PartialState

    from .build import database_embedder, index_from_shards

    check_device(args.device)
    store_path = None if args.out is None else args.store or _default_store(args.out)
    # absolute, links kept: a report names the user's file, not where a link points. An index or
    # store inside --images is not listed (list_image_files leaves out folders vprhub wrote).
    files = [Path(os.path.abspath(p)) for p in list_image_files(args.images)]
    if not files:
        raise ValueError(f"no files in {args.images}")
    rows = _metadata_rows(args, files)
    if args.compress is not None:
        if args.index_type != "flat":
            raise ValueError("give --compress or --index-type, not both")
        args.index_type = args.compress
    if args.backend == "milvus":
        return _build_milvus(args, files, rows)
    if args.uri is not None:
        raise ValueError("--uri is for --backend milvus; the faiss backend writes the folder --out")
    if args.out is None:
        raise ValueError("--out is required with the faiss backend (or use --backend milvus --uri ...)")
    inputs = [args.images] + ([args.metadata] if args.metadata is not None else [])
    check_replaceable(args.out, args.overwrite, PLACE_INDEX, inputs)
    # under `accelerate launch` each process embeds its share of the store; alone, no process group
    state = PartialState(cpu=args.device == "cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    rank, processes = (state.process_index, state.num_processes) if state else (0, 1)
    device = args.device or (str(state.device) if state else None)
    pipe = as_pipeline(load_model(args.model, "--model"), **({"device": device} if device else {}))
    factory_string(args.index_type, pipe.descriptor_dim, len(files))  # an option that cannot fit fails now, not after embedding
    engine = database_embedder(pipe, args.batch_size, args.precision, args.num_workers)
    store_local = pipe.produces_local_features and args.local_features != "recompute"
    if args.store is None and rank == 0 and _stale_store(store_path, engine, files, store_local):
        shutil.rmtree(store_path)  # our own leftover of other inputs or settings: start afresh
    if state is not None:
        state.wait_for_everyone()
    try:
        store = engine.embed_to_store(
            files,
            store_path,
            local_features=store_local,
            process_index=rank,
            num_processes=processes,
            progress=not args.quiet and (state is None or state.is_local_main_process),
            desc="indexing",
        )
        if state is not None:
            state.wait_for_everyone()
        if rank != 0:
            return 0
        index = index_from_shards(store.shards(), files, rows, engine, args.index_type, args.local_features)
        index.build_report["image_root"] = os.path.abspath(args.images)  # hloc names are relative to it
        report = index.build_report
        report.update(seconds=engine.report.seconds, images_per_second=engine.report.images_per_second)
        index.save(args.out, overwrite=args.overwrite)
    except KeyboardInterrupt:  # an interrupted build keeps its store to resume from
        if rank == 0:
            print(f"the finished shards stay in {store_path}: run the same command again to resume", file=sys.stderr)
        raise
    except Exception:
        if args.store is None and rank == 0:
            _remove_own_store(store_path)
        raise
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


def _default_store(out: Path) -> Path:
    """The hidden descriptor store beside ``out``, removed once the index is written (a hash of a
    name too long to take the prefix and suffix, as for temporaries)."""
    return out.with_name(f".{temporary_stem(out.name)}.embeddings")


def _own_store(path: Path) -> Any:
    """The descriptor store at ``path`` if it holds only what vprhub wrote, else None."""
    from ..descriptor_store import DescriptorStore

    try:
        store = DescriptorStore.open(path)
    except ValueError:
        return None
    return store if store.holds_only_its_files() else None


def _stale_store(path: Path, engine: Any, files: list[Path], local_features: bool) -> bool:
    """True when ``path`` is a descriptor store vprhub left for other inputs or settings."""
    store = _own_store(path)
    return store is not None and store.manifest["key"] != json.loads(
        json.dumps(engine.store_key(files, local_features), default=str)
    )


def _remove_own_store(path: Path) -> None:
    """Delete the default store of a failed build (only if it holds nothing but vprhub's files)."""
    if _own_store(path) is not None:
        shutil.rmtree(path, ignore_errors=True)


def plan_command(args: argparse.Namespace) -> int:
    from .plan import default_options, format_plan, plan

    if (args.model is None) == (args.dim is None):
        raise ValueError("give --model or --dim")
    dim, local_shape, dataset = args.dim, None, None
    if args.model is not None:
        pipe = as_pipeline(load_model(args.model, "--model"), device="cpu")
        dim = pipe.descriptor_dim
        if args.local_features:
            if not pipe.produces_local_features:
                raise ValueError(f"{args.model} produces no local features")
            from .plan import probe_local_shape

            local_shape = probe_local_shape(pipe)
        if args.dataset is not None:
            from .plan import embed_test_set

            dataset = embed_test_set(pipe, args.dataset)
    elif args.local_features or args.dataset is not None:
        raise ValueError("--local-features and --dataset need --model")
    rows = plan(args.images, dim, ["flat", *(args.compress or default_options(dim))], local_shape, dataset)
    if local_shape is None:
        print(json.dumps(rows, indent=1) if args.json else format_plan(rows, args.images, dim))
        return 0
    from .plan import format_local_plan, local_feature_plan

    local_rows = local_feature_plan(args.images, local_shape)
    if args.json:
        print(json.dumps({"options": rows, "local_features": local_rows}, indent=1))
    else:
        print(format_plan(rows, args.images, dim) + "\n" + format_local_plan(local_rows, local_shape))
    return 0


def _build_milvus(args: argparse.Namespace, files: list[Path], rows: list[dict]) -> int:
    """Embed into a Milvus collection chunk by chunk; a re-run after a kill skips the files
    already there (by path) and completes the collection."""
    if args.uri is None or args.out is not None:
        raise ValueError("--backend milvus writes to --uri (map.db or http://host:19530), not --out")
    if args.index_type != "flat":
        raise ValueError(f"the milvus backend stores float32 vectors and searches exactly; {args.index_type!r} is faiss-only")
    pipe = as_pipeline(load_model(args.model, "--model"), **({"device": args.device} if args.device else {}))
    if args.overwrite:  # replace only a collection vprhub wrote
        store = MilvusStore(args.uri, args.collection)
        if store.exists():
            if (store.manifest() or {}).get("format") != FORMAT:
                raise ValueError(f"Milvus collection {args.collection!r} at {args.uri} was not written by vprhub: not replaced")
            store.drop()
        store.close()
    # refuses another model or width before anything is written
    index = PlaceIndex(pipe.descriptor_dim, identity=pipe.identity(), backend="milvus", uri=args.uri,
                       collection=args.collection)
    done = {m.get("path") for m in index.metadata(index.ids)}
    todo = [(f, r) for f, r in zip(files, rows) if str(f) not in done]
    report = dict(index.build_report or {"images": 0, "indexed": 0, "skipped": [], "seconds": 0.0})
    report.update(images=len(files), batch_size=args.batch_size, image_root=os.path.abspath(args.images))
    chunk = args.batch_size * max(1, MILVUS_CHUNK // args.batch_size)  # whole model batches per chunk
    added = 0
    for start in range(0, len(todo), chunk):
        part_files, part_rows = zip(*todo[start : start + chunk])
        try:
            part = build_index(pipe, list(part_files), metadata=list(part_rows), batch_size=args.batch_size,
                                    store_local_features=False, progress=not args.quiet)
        except ValueError as err:  # a chunk of unreadable files only
            report["skipped"] += [{"input": str(f), "error": str(err)} for f in part_files]
            continue
        index.add_index(part)
        added += len(part)
        report["skipped"] += part.build_report["skipped"]
        report["seconds"] = round(report["seconds"] + part.build_report["seconds"], 3)
        index.build_report = report | {"indexed": len(index)}
        index.save()
    index.build_report = report | {"indexed": len(index)}
    index.save()
    there = len(files) - len(todo)
    print(f"indexed {there + added} of {len(files)} files ({there} already there) into Milvus collection "
          f"{args.collection!r} at {args.uri}, which holds {len(index)} entries")
    for skipped in report["skipped"]:
        print(f"  skipped {skipped['input']}: {skipped['error']}")
    index.close()
    return 0


def _printable(text: object) -> str:
    """``text`` with control characters (newlines, carriage returns, escapes) written as ``\\n``-style
    escapes, so a file name cannot break or forge a line of the table."""
    return "".join(repr(c)[1:-1] if not c.isprintable() and c != " " else c for c in str(text))


def _table(query: Path, hits: list[dict]) -> str:
    rerank = any("rerank_score" in h for h in hits)
    head = f"{'rank':>4}  {'id':>8}  {'score':>8}" + ("  {:>6}".format("mnn") if rerank else "") + "  metadata"
    lines = [f"query {_printable(query)}", head]
    for rank, hit in enumerate(hits, 1):
        meta = _printable(", ".join(f"{k}={v}" for k, v in hit["metadata"].items()))
        mnn = f"  {hit['rerank_score']:>6.0f}" if rerank else ""
        lines.append(f"{rank:>4}  {hit['index']:>8}  {hit['score']:>8.4f}{mnn}  {meta}")
    return "\n".join(lines)


def _filtered_search(pipe: Any, index: PlaceIndex, args: argparse.Namespace) -> list[list[dict]]:
    """Embed the queries, then search with the metadata filter / geographic prior."""
    if args.rerank:
        raise ValueError("--rerank cannot be combined with --near / --where yet")
    if (args.near is None) != (args.radius_m is None):
        raise ValueError("--near and --radius-m go together")
    index.check_compatible(pipe.identity())
    kwargs = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if "batch_size" not in kwargs and pipe.batch_dependent and (index.build_report or {}).get("batch_size"):
        kwargs["batch_size"] = index.build_report["batch_size"]
    descriptors = np.stack(pipe([str(q) for q in args.queries], **kwargs))
    scores, ids = index.search(descriptors, args.top_k, where=dict(args.where), near=args.near,
                               radius_m=args.radius_m, coordinate_keys=args.coordinate_keys)
    results = []
    for row_scores, row_ids in zip(scores, ids):
        keep = row_ids >= 0
        results.append([{"score": float(s), "index": int(i), "metadata": m} for s, i, m in
                        zip(row_scores[keep], row_ids[keep], index.metadata(row_ids[keep]))])
    return results


def _plot_paths(plot: Path, count: int) -> list[Path]:
    """``--plot NAME.png``: that file for one query, ``NAME_<i>.png`` for several."""
    return [plot] if count == 1 else [plot.with_name(f"{plot.stem}_{i}{plot.suffix}") for i in range(count)]


def _check_search_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, output files that would replace anything but vprhub's own."""
    from .plotting import PLOT_FILE

    targets = [(path, PLOT_FILE) for path in _plot_paths(args.plot, len(args.queries))] if args.plot else []
    if args.pairs is not None:
        targets.append((args.pairs, PAIRS_FILE))
    for path, kind in targets:
        check_replaceable_file(path, args.overwrite, kind, inputs=args.queries)


def search_command(args: argparse.Namespace) -> int:
    _check_search_outputs(args)
    check_device(args.device)
    index = PlaceIndex.load(args.index, collection=args.collection)
    model = load_index_model(args.index, index.identity, args.model)
    pipe = as_pipeline(model, **({"device": args.device} if args.device else {}))
    if args.near is not None or args.radius_m is not None or args.where:
        results = _filtered_search(pipe, index, args)
    else:
        kwargs = dict(index=index, top_k=args.top_k)
        if args.rerank:
            kwargs.update(rerank=True, rerank_candidates=args.rerank_candidates, return_correspondences=bool(args.plot))
        if args.batch_size is not None:
            kwargs["batch_size"] = args.batch_size
        results = pipe([str(q) for q in args.queries], **kwargs)
    if args.plot is not None:
        from .plotting import plot_matches

        for query, hits, path in zip(args.queries, results, _plot_paths(args.plot, len(args.queries))):
            written = plot_matches(query, hits, path)
            print(f"plot of {_printable(query)}: {written}", file=sys.stderr)
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
