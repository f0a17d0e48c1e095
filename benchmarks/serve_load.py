"""Load test of ``vprhub serve`` on loopback with a tiny random SALAD (CPU).

    python benchmarks/serve_load.py [--clients 16] [--seconds 10] [--overload-seconds 10]
        [--places 50] [--image-size 112] [--rounds 3] [--quick]

The service runs in its own process (``vprhub serve``, one torch thread: ``OMP_NUM_THREADS=1``),
so its peak memory (VmHWM) is its own.
Closed-loop clients (each sends its next photo as soon as its previous answer arrives) measure

1. dynamic batching on (``--max-batch 32 --max-wait-ms 5``) and off (``--max-batch 1``):
   requests/s, p50/p95/p99 latency, batch sizes formed, server peak memory;
2. overload: an open-loop arrival rate of 10x the throughput measured in 1, against a fresh
   batching server (``--max-queue 64``): status codes (only 200 and 503 expected), answers that
   do not match their photo (expected: none), server memory before and at peak, and whether
   the service answers normally once the load stops.

Every answer is checked against the photo's own hits from ``PlaceIndex.search`` on descriptors
computed directly: a mixed-up answer (another client's hits) is counted. Everything is bounded:
clients stop after ``--seconds``, the overload sends at most ``rate x seconds`` requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import vprhub
from vprhub.data.synthetic import SyntheticPlaces
from vprhub.pipelines import build_index
from vprhub.pipelines.place_recognition import as_pipeline

TOP_K = 5


def build_map(folder: Path, places: int, image_size: int) -> tuple[Path, list[bytes], np.ndarray, np.ndarray]:
    """Tiny model + index on disk; the query photos as JPEG bytes with their expected ids and scores."""
    torch.manual_seed(0)
    model_dir = folder / "model"
    vprhub.build_model("salad", image_size=[image_size, image_size]).save_pretrained(model_dir)
    vprhub.vpr_image_processor(image_size, image_size).save_pretrained(model_dir)
    pipe = as_pipeline(str(model_dir))
    database = SyntheticPlaces(num_places=places, views_per_place=2, image_size=image_size, seed=11)
    index = build_index(pipe, database.save_images(folder / "db"), progress=False)
    index.save(folder / "map.vprindex")
    queries = SyntheticPlaces(
        num_places=min(places, 16), views_per_place=1, image_size=image_size, seed=11, first_view=9
    )
    photos = []
    for i in range(len(queries)):
        buffer = io.BytesIO()
        queries[i]["image"].save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    from PIL import Image

    descriptors = np.stack(pipe([Image.open(io.BytesIO(p)) for p in photos]))
    scores, ids = index.search(descriptors, TOP_K)
    return folder / "map.vprindex", photos, ids, scores


def per_photo_costs(model_dir: Path, photo: bytes, batch: int = 32) -> None:
    """What the model worker spends per photo, one torch thread: the ceiling of the batching gain."""
    from vprhub.serve.uploads import decode_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = as_pipeline(str(model_dir))
    image = decode_image(photo, 10**8)
    pixels = pipe.preprocess(image)["pixels"]

    def ms(work, repeat: int = 20) -> float:
        work()
        start = time.perf_counter()
        for _ in range(repeat):
            work()
        return (time.perf_counter() - start) / repeat * 1000

    decode = ms(lambda: decode_image(photo, 10**8))
    preprocess = ms(lambda: pipe.preprocess(image))
    single = ms(lambda: pipe.forward({"pixels": pixels}))
    batched = ms(lambda: pipe.forward({"pixels": pixels.expand(batch, -1, -1, -1)}), 5) / batch
    torch.set_num_threads(threads)
    print(
        f"per photo, 1 thread: decode {decode:.2f} ms, preprocess {preprocess:.2f} ms, forward {single:.2f} ms "
        f"alone vs {batched:.2f} ms in a batch of {batch} -> model-bound ceiling of the batching gain "
        f"{(preprocess + single) / (preprocess + batched):.1f}x"
    )


class Server:
    """``vprhub serve`` in a subprocess on a free loopback port."""

    def __init__(self, index: Path, *options: str, threads: int = 1) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vprhub.cli", "serve", "--index", str(index), "--port", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
        self.process = subprocess.Popen([*command, "--top-k", str(TOP_K), *options], stdout=subprocess.DEVNULL, env=env)
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def memory_mb(self, field: str) -> float:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the server process, MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(field)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


class Tally:
    """Status codes, latencies of answered requests and mixed-up answers."""

    def __init__(self, expected_ids: np.ndarray, expected_scores: np.ndarray) -> None:
        self.expected_ids, self.expected_scores = expected_ids, expected_scores
        self.statuses: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.wrong = 0
        self.retry_after_missing = 0

    def record(self, photo: int, response: httpx.Response | Exception, seconds: float) -> None:
        if isinstance(response, Exception):
            self.statuses[type(response).__name__] += 1
            return
        self.statuses[response.status_code] += 1
        if response.status_code == 503 and "retry-after" not in response.headers:
            self.retry_after_missing += 1
        if response.status_code != 200:
            return
        self.latencies.append(seconds)
        hits = response.json()["results"][0]["hits"]
        same_ids = [h["id"] for h in hits] == self.expected_ids[photo].tolist()
        if not same_ids or not np.allclose([h["score"] for h in hits], self.expected_scores[photo], atol=1e-4):
            self.wrong += 1

    def percentiles_ms(self) -> str:
        if not self.latencies:
            return "no answers"
        p50, p95, p99 = np.percentile(self.latencies, [50, 95, 99]) * 1000
        return f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  p99 {p99:6.1f} ms"


def encoded(photos: list[bytes]) -> list[tuple[bytes, dict]]:
    """Each photo as a ready multipart body + headers: the clients spend no CPU on encoding."""
    bodies = []
    for photo in photos:
        request = httpx.Request("POST", "http://x/search", files=[("images", ("q.jpg", photo, "image/jpeg"))])
        bodies.append((request.read(), {"content-type": request.headers["content-type"]}))
    return bodies


async def post(client: httpx.AsyncClient, url: str, photo: tuple[bytes, dict]) -> httpx.Response | Exception:
    try:
        return await client.post(f"{url}/search", content=photo[0], headers=photo[1])
    except httpx.HTTPError as err:
        return err


async def closed_loop(url: str, photos: list[bytes], tally: Tally, clients: int, seconds: float) -> float:
    """``clients`` clients, each sending its next photo when its answer arrives; returns the wall time."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        stop = start + seconds

        async def run(client_number: int) -> None:
            sent = client_number
            while time.perf_counter() < stop:
                photo = sent % len(photos)
                began = time.perf_counter()
                tally.record(photo, await post(client, url, photos[photo]), time.perf_counter() - began)
                sent += clients

        await asyncio.gather(*(run(i) for i in range(clients)))
        return time.perf_counter() - start


async def open_loop(url: str, photos: list[bytes], tally: Tally, rate: float, seconds: float) -> float:
    """Requests at ``rate`` per second whatever the answers, for ``seconds``; returns the achieved rate."""
    total = int(rate * seconds)
    # 128 connections: more than the server admits at once (max_queue + max_batch = 96), few enough
    # that the client's own pool stays cheap; a request waiting for a free connection counts in its latency.
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(number: int) -> None:
            began = time.perf_counter()
            response = await post(client, url, photos[number % len(photos)])
            tally.record(number % len(photos), response, time.perf_counter() - began)

        tasks = []
        start = time.perf_counter()
        for number in range(total):
            delay = start + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(number)))
        sending = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return total / sending


def batches(url: str) -> str:
    formed = httpx.get(f"{url}/info").json()["batching"]["batches_formed"]
    sizes = np.repeat([int(k) for k in formed], list(formed.values()))
    return f"{len(sizes)} batches, mean size {sizes.mean():.1f}, max {sizes.max()}" if len(sizes) else "no batches"


def measure(index: Path, photos, ids, scores, clients: int, seconds: float, *options: str) -> float:
    server = Server(index, *options)
    try:
        tally = Tally(ids, scores)
        asyncio.run(closed_loop(server.url, photos[:4], Tally(ids, scores), 4, 1.0))  # warm-up
        wall = asyncio.run(closed_loop(server.url, photos, tally, clients, seconds))
        rate = len(tally.latencies) / wall
        print(f"  {' '.join(options):<34} {rate:7.1f} req/s  {tally.percentiles_ms()}  {batches(server.url)}")
        print(
            f"  {'':<34} statuses {dict(tally.statuses)}  mixed-up answers {tally.wrong}  "
            f"server peak memory {server.memory_mb('VmHWM'):.0f} MB"
        )
        return rate
    finally:
        server.close()


def overload(index: Path, photos, ids, scores, rate: float, seconds: float) -> None:
    server = Server(index, "--max-batch", "32", "--max-wait-ms", "5", "--max-queue", "64")
    try:
        asyncio.run(closed_loop(server.url, photos, Tally(ids, scores), 16, 1.0))  # warm-up
        before = server.memory_mb("VmRSS")
        tally = Tally(ids, scores)
        achieved = asyncio.run(open_loop(server.url, photos, tally, rate, seconds))
        peak = server.memory_mb("VmHWM")
        others = {k: v for k, v in tally.statuses.items() if k not in (200, 503)}
        print(f"  offered {rate:.0f} req/s (achieved sending {achieved:.0f} req/s) for {seconds:g} s")
        print(
            f"  statuses {dict(tally.statuses)}  other errors {others or 'none'}  mixed-up answers {tally.wrong}  "
            f"503 without Retry-After {tally.retry_after_missing}"
        )
        print(f"  answered: {tally.percentiles_ms()}")
        print(f"  server memory {before:.0f} MB before, {peak:.0f} MB peak; {batches(server.url)}")
        after = Tally(ids, scores)
        asyncio.run(closed_loop(server.url, photos, after, 4, 1.0))
        ok = after.statuses.get(200, 0)
        recovered = ok > 0 and ok == sum(after.statuses.values()) and after.wrong == 0
        print(f"  after the load: {ok} requests, statuses {dict(after.statuses)} -> recovered: {recovered}")
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--places", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 s runs, 3 s of overload")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.overload_seconds, args.rounds = 4.0, 3.0, 2
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; tiny SALAD at {args.image_size} px")
    with tempfile.TemporaryDirectory() as tmp:
        index, photos, ids, scores = build_map(Path(tmp), args.places, args.image_size)
        per_photo_costs(Path(tmp) / "model", photos[0])
        photos = encoded(photos)
        print(f"{args.clients} closed-loop clients, {args.seconds:g} s per run, on and off alternating:")
        rates = collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, options in (("on", ("--max-batch", "32", "--max-wait-ms", "5")), ("off", ("--max-batch", "1"))):
                rates[name].append(measure(index, photos, ids, scores, args.clients, args.seconds, *options))
        on, off = np.median(rates["on"]), np.median(rates["off"])
        print(f"  dynamic batching: {on / off:.2f}x the throughput of one request per forward pass (medians)")
        print("overload at 10x the batching throughput:")
        overload(index, photos, ids, scores, 10 * on, args.overload_seconds)


if __name__ == "__main__":
    main()
