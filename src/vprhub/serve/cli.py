"""``vprhub serve``: run the localisation service over a place index."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from .settings import ServeSettings

API_KEY_ENV = "VPRHUB_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command."""
    defaults = ServeSettings()
    serve = subparsers.add_parser("serve", help="serve a place index over HTTP (search API and a page to try it)")
    serve.add_argument("--index", required=True, type=Path, help="a .vprindex folder")
    serve.add_argument("--model", help="model to embed the photos (default: the one recorded in the index)")
    serve.add_argument("--device", help="torch device, e.g. cpu or cuda:0")
    serve.add_argument("--host", default=defaults.host, help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=defaults.port)
    serve.add_argument("--top-k", type=int, default=defaults.top_k, help="hits per photo (a request may ask otherwise)")
    serve.add_argument("--rerank", action="store_true", help="re-rank by SelaVPR local features")
    serve.add_argument("--rerank-candidates", type=int, default=defaults.rerank_candidates)
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, help="photos per forward pass")
    serve.add_argument(
        "--max-wait-ms", type=float, default=defaults.max_wait_ms, help="how long a photo waits for batch mates"
    )
    serve.add_argument(
        "--max-queue", type=int, default=defaults.max_queue, help="photos waiting at most; beyond: 503 + Retry-After"
    )
    serve.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_mb, help="largest request body")
    serve.add_argument("--max-pixels", type=int, default=defaults.max_pixels, help="largest photo (width x height)")
    serve.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="per-request time limit")
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"key required in the X-API-Key header (default: ${API_KEY_ENV}); needed off loopback",
    )
    serve.set_defaults(func=serve_command)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Checked settings from the parsed command line."""
    names = [field for field in ServeSettings.__dataclass_fields__ if hasattr(args, field)]
    return ServeSettings(**{name: getattr(args, name) for name in names}).check()


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from ..loading import check_device, load_index_model
    from ..pipelines import PlaceIndex
    from ..pipelines.place_recognition import as_pipeline
    from .app import create_app
    from .searcher import PlaceSearcher

    settings = settings_from_args(args)  # refuse a bad bind or device before loading anything
    check_device(args.device)
    listening = listen(settings.host, settings.port)
    index = PlaceIndex.load(args.index)
    model = load_index_model(args.index, index.identity, args.model)
    pipe = as_pipeline(model, **({"device": args.device} if args.device else {}))
    searcher = PlaceSearcher(pipe, index, rerank=settings.rerank, rerank_candidates=settings.rerank_candidates)
    app = create_app(searcher, settings)
    kind = pipe.model.config.model_type
    port = listening.getsockname()[1]
    print(f"serving {args.index} ({len(index)} places, {kind}) on http://{settings.host}:{port}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (``port`` 0: any free one), or a clear error when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock
