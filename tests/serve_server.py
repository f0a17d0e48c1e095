"""Helpers of the serve tests: a tiny map on disk, and a real uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn

import vprhub
from vprhub.data.synthetic import SyntheticPlaces
from vprhub.pipelines import build_index
from vprhub.pipelines.place_recognition import as_pipeline

IMAGE_SIZE = [56, 56]


def tiny_map(folder: Path, model_type: str = "salad", **config) -> tuple:
    """A tiny random model's pipeline, an index of 6 places x 2 views (jpg files with gmberton
    names, so positions come from the paths) and one query view of each place."""
    torch.manual_seed(0)
    pipe = as_pipeline(vprhub.build_model(model_type, image_size=IMAGE_SIZE, **config))
    database = SyntheticPlaces(num_places=6, views_per_place=2, image_size=64, seed=5)
    queries = SyntheticPlaces(num_places=6, views_per_place=1, image_size=64, seed=5, first_view=5)
    paths = database.save_images(folder / "db")
    index = build_index(pipe, paths, metadata=[{"place": int(p)} for p in database.labels], progress=False)
    return pipe, index, queries.save_images(folder / "queries")


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on a free 127.0.0.1 port until the block ends; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
