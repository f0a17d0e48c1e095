"""Load test of ``vprhub serve`` on loopback with a tiny random SALAD (CPU).

    python benchmarks/serve_load.py [--clients 16] [--seconds 10] [--overload-seconds 10]
        [--places 50] [--image-size 112] [--rounds 3] [--quick]

The service runs in its own process (``vprhub serve``, one torch thread: ``OMP_NUM_THREADS=1``),
so its peak memory (VmHWM) is its own.
Closed-loop clients (each sends its next photo as soon as its previous answer arrives) measure

1. dynamic batching on (``--max-batch 32 --max-wait-ms 5``) and off (``--max-batch 1``):
   requests/s, p50/p95/p99 latency, batch sizes formed, server peak memory;
2. overload: an open-loop arrival rate of 10x the throughput measured in 1, against a fresh
   batching server (``--max-queue 64``), over 256 keep-alive connections (more than the 96
   requests the server admits at once): status codes (only 200 and 503 expected), answers that
   do not match their photo (expected: none), the rate actually sent, latency counted from each
   request's scheduled arrival, server memory before and at peak, and whether the service
   answers normally once the load stops.

The clients write prepared HTTP/1.1 requests on their own connections (:class:`Connection`):
a full HTTP client costs more CPU per request than the server spends on a refusal, and could
not offer 10x from the one core the server leaves. Every answer is checked against the
photo's own hits from ``PlaceIndex.search`` on descriptors computed directly: a mixed-up answer
(another client's hits) is counted. Everything is bounded: clients stop after ``--seconds``;
the overload sends at most ``rate x seconds`` requests, and a request still without a
connection ``2 x --overload-seconds`` after the start is counted ``unsent``; every request
has a 60 s timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
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
REQUEST_TIMEOUT_S = 60.0
OVERLOAD_CONNECTIONS = 256  # more than the server admits at once (max_queue + max_batch = 96)


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


Answer = tuple[int, dict[str, str], bytes]  # status, headers (lower-case names), body


class Connection:
    """One keep-alive HTTP/1.1 connection to the server that sends ready-made requests.

    A load generator written with a full HTTP client spends more CPU per request than the
    server does on a refusal, so it cannot offer 10x the server's capacity from one core; this
    one writes prepared bytes and reads the status line, the headers and a ``Content-Length`` body.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes, timeout: float) -> Answer:
        try:
            async with asyncio.timeout(timeout):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(raw)
                head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = dict(line.split(":", 1) for line in head[1:] if line)
                headers = {name.strip().lower(): value.strip() for name, value in headers.items()}
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(head[0].split()[1]), headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Tally:
    """Status codes, latencies of answered requests and mixed-up answers."""

    def __init__(self, expected_ids: np.ndarray, expected_scores: np.ndarray) -> None:
        self.expected_ids, self.expected_scores = expected_ids, expected_scores
        self.statuses: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self.wrong = 0
        self.retry_after_missing = 0

    def record(self, photo: int, answer: Answer | BaseException, seconds: float) -> None:
        if isinstance(answer, BaseException):
            self.statuses[type(answer).__name__] += 1
            return
        status, headers, body = answer
        self.statuses[status] += 1
        if status == 503 and "retry-after" not in headers:
            self.retry_after_missing += 1
        if status != 200:
            return
        self.latencies.append(seconds)
        hits = json.loads(body)["results"][0]["hits"]
        same_ids = [h["id"] for h in hits] == self.expected_ids[photo].tolist()
        if not same_ids or not np.allclose([h["score"] for h in hits], self.expected_scores[photo], atol=1e-4):
            self.wrong += 1

    def percentiles_ms(self) -> str:
        if not self.latencies:
            return "no answers"
        p50, p95, p99 = np.percentile(self.latencies, [50, 95, 99]) * 1000
        return f"p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  p99 {p99:6.1f} ms"


def encoded(photos: list[bytes]) -> list[bytes]:
    """Each photo as a complete ``POST /search`` request (multipart body): no encoding while measuring."""
    requests = []
    for photo in photos:
        request = httpx.Request("POST", "http://127.0.0.1/search", files=[("images", ("q.jpg", photo, "image/jpeg"))])
        body = request.read()
        head = (
            f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {request.headers['content-type']}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + body)
    return requests


async def closed_loop(port: int, requests: list[bytes], tally: Tally, clients: int, seconds: float) -> float:
    """``clients`` clients, each sending its next photo when its answer arrives; returns the wall time."""
    start = time.perf_counter()
    stop = start + seconds

    async def run(client_number: int) -> None:
        connection, sent = Connection("127.0.0.1", port), client_number
        try:
            while time.perf_counter() < stop:
                photo = sent % len(requests)
                began = time.perf_counter()
                try:
                    answer = await connection.request(requests[photo], REQUEST_TIMEOUT_S)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as err:
                    answer = err
                tally.record(photo, answer, time.perf_counter() - began)
                sent += clients
        finally:
            connection.close()

    await asyncio.gather(*(run(i) for i in range(clients)))
    return time.perf_counter() - start


async def open_loop(
    port: int, requests: list[bytes], tally: Tally, rate: float, seconds: float, connections: int
) -> tuple[int, float]:
    """Requests arriving at ``rate`` per second for ``seconds``, whatever the answers, over a pool of
    ``connections`` keep-alive connections. A request waits (first come, first served) for a free
    connection, and its latency counts from its scheduled arrival. One that found no free
    connection within ``seconds`` after the last arrival is given up and counted as ``unsent``.
    Returns the requests sent and the rate at which they were sent."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection("127.0.0.1", port))
    total = int(rate * seconds)
    start = time.perf_counter()
    give_up = start + 2 * seconds
    sent_at: list[float] = []

    async def one(number: int, arrival: float) -> None:
        photo = number % len(requests)
        try:
            async with asyncio.timeout(max(0.0, give_up - time.perf_counter())):
                connection = await idle.get()
        except TimeoutError:
            tally.statuses["unsent"] += 1
            return
        sent_at.append(time.perf_counter())
        try:
            answer = await connection.request(requests[photo], REQUEST_TIMEOUT_S)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as err:
            answer = err
        finally:
            idle.put_nowait(connection)
        tally.record(photo, answer, time.perf_counter() - arrival)

    tasks = []
    for number in range(total):
        arrival = start + number / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(number, arrival)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait().close()
    span = (max(sent_at) - start) if sent_at else float("nan")
    return len(sent_at), len(sent_at) / span


def batches(url: str) -> str:
    formed = httpx.get(f"{url}/info").json()["batching"]["batches_formed"]
    sizes = np.repeat([int(k) for k in formed], list(formed.values()))
    return f"{len(sizes)} batches, mean size {sizes.mean():.1f}, max {sizes.max()}" if len(sizes) else "no batches"


def measure(index: Path, requests, ids, scores, clients: int, seconds: float, *options: str) -> float:
    server = Server(index, *options)
    try:
        tally = Tally(ids, scores)
        asyncio.run(closed_loop(server.port, requests[:4], Tally(ids, scores), 4, 1.0))  # warm-up
        wall = asyncio.run(closed_loop(server.port, requests, tally, clients, seconds))
        rate = len(tally.latencies) / wall
        print(f"  {' '.join(options):<34} {rate:7.1f} req/s  {tally.percentiles_ms()}  {batches(server.url)}")
        print(
            f"  {'':<34} statuses {dict(tally.statuses)}  mixed-up answers {tally.wrong}  "
            f"server peak memory {server.memory_mb('VmHWM'):.0f} MB"
        )
        return rate
    finally:
        server.close()


def overload(index: Path, requests, ids, scores, rate: float, seconds: float) -> None:
    server = Server(index, "--max-batch", "32", "--max-wait-ms", "5", "--max-queue", "64")
    try:
        asyncio.run(closed_loop(server.port, requests, Tally(ids, scores), 16, 1.0))  # warm-up
        before = server.memory_mb("VmRSS")
        tally = Tally(ids, scores)
        began = time.perf_counter()
        sent, sending_rate = asyncio.run(
            open_loop(server.port, requests, tally, rate, seconds, OVERLOAD_CONNECTIONS)
        )
        wall = time.perf_counter() - began
        peak = server.memory_mb("VmHWM")
        others = {k: v for k, v in tally.statuses.items() if k not in (200, 503)}
        print(
            f"  offered {rate:.0f} req/s for {seconds:g} s ({int(rate * seconds)} requests) over "
            f"{OVERLOAD_CONNECTIONS} connections; sent {sent} at {sending_rate:.0f} req/s; done in {wall:.1f} s"
        )
        print(
            f"  statuses {dict(tally.statuses)}  other errors {others or 'none'}  mixed-up answers {tally.wrong}  "
            f"503 without Retry-After {tally.retry_after_missing}"
        )
        print(f"  answered (latency from the scheduled arrival): {tally.percentiles_ms()}")
        print(f"  server memory {before:.0f} MB before, {peak:.0f} MB peak; {batches(server.url)}")
        after = Tally(ids, scores)
        asyncio.run(closed_loop(server.port, requests, after, 4, 1.0))
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
        requests = encoded(photos)
        print(f"{args.clients} closed-loop clients, {args.seconds:g} s per run, on and off alternating:")
        rates = collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, options in (("on", ("--max-batch", "32", "--max-wait-ms", "5")), ("off", ("--max-batch", "1"))):
                rates[name].append(measure(index, requests, ids, scores, args.clients, args.seconds, *options))
        on, off = np.median(rates["on"]), np.median(rates["off"])
        print(f"  dynamic batching: {on / off:.2f}x the throughput of one request per forward pass (medians)")
        print("overload at 10x the batching throughput:")
        overload(index, requests, ids, scores, 10 * on, args.overload_seconds)


if __name__ == "__main__":
    main()
