"""SelaVPR re-ranking: time per query to score K candidates by mutual nearest neighbours.

Compares vprhub's ``mutual_nn_scores`` (candidates in chunks, similarity in blocks of 128
candidate positions) with a loop over candidates that builds each full similarity matrix, as
the official code's per-candidate logic does. Default: K = 100 candidates with the official
61 x 61 x 128 local maps (random unit vectors), on CPU and on CUDA when available. Each
variant runs in its own process. Reported: median wall-clock ms per query, the smallest CPU
time per query (all threads: steadier than wall time on a shared machine, but with several
threads it includes OpenMP spin-waiting, so compare work with --threads 1), and peak memory:
the growth of the peak resident set above the inputs (CPU; it includes what the C allocator
keeps cached) or the peak allocation above the inputs (CUDA). The official code would also
hold all K similarity matrices at once: K * N * N * 4 bytes (5.5 GB here).

    python benchmarks/rerank.py [--candidates 100] [--size 61 61] [--dim 128] [--queries 3]
                                [--devices cpu cuda] [--chunk-size K] [--threads N] [--no-malloc-cache]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import torch

from vprhub.modeling.local_matching import mutual_nn_scores

STATUS = Path("/proc/self/status")


def loop_scores(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """One full similarity matrix per candidate, scored in a Python loop (the straightforward way)."""
    query = query.reshape(-1, query.shape[-1])
    positions = torch.arange(query.shape[0], device=query.device)
    scores = torch.zeros(candidates.shape[0], device=query.device)
    for k, candidate in enumerate(candidates):
        similarity = candidate.reshape(-1, query.shape[-1]) @ query.T
        best_candidate = similarity.argmax(dim=0)
        best_query = similarity.argmax(dim=1)
        count = int((best_query[best_candidate] == positions).sum())
        scores[k] = 0 if count == 1 else count
    return scores


def _resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1))


def _unit_maps(count: int, size: tuple[int, int], dim: int, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    maps = torch.empty(count, *size, dim, device=device)
    for i in range(count):  # in place, so building the inputs does not raise the peak
        maps[i].normal_(generator=generator)
        maps[i] /= maps[i].norm(dim=-1, keepdim=True)
    return maps


def _run(variant: str, args: argparse.Namespace, device: str, queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    size = tuple(args.size)
    queries = _unit_maps(args.queries, size, args.dim, device, seed=0)
    candidates = _unit_maps(args.candidates, size, args.dim, device, seed=1)
    if variant == "vprhub":

        def score(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            return mutual_nn_scores(query, candidates, chunk_size=args.chunk_size)

    else:
        score = loop_scores
    score(queries[0], candidates[:2])  # warm-up

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        STATUS.with_name("clear_refs").write_text("5")  # reset the peak resident set (Linux)
        base = _resident_kib("VmRSS") * 1024
    times, cpu_times, results = [], [], []
    for query in queries:
        start, cpu_start = time.perf_counter(), time.process_time()
        results.append(score(query, candidates))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _resident_kib("VmHWM") * 1024 - base
    median = sorted(times)[len(times) // 2] * 1000
    queue.put((median, min(cpu_times) * 1000, peak / 2**20, torch.stack(results).tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--size", type=int, nargs=2, default=[61, 61], metavar=("H", "W"))
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=3, help="queries timed (the median is reported)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--chunk-size", type=int, default=None, help="default: mutual_nn_scores' own per device")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--no-malloc-cache",
        action="store_true",
        help="workers run with glibc MALLOC_MMAP_THRESHOLD_=65536, so freed blocks return to the system "
        "and the CPU peak shows live memory rather than what the allocator keeps",
    )
    args = parser.parse_args()
    if args.no_malloc_cache:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned workers' C library

    positions = args.size[0] * args.size[1]
    context = mp.get_context("spawn")
    print(
        f"SelaVPR re-ranking: K={args.candidates} candidates, maps {args.size[0]}x{args.size[1]}x{args.dim}, "
        f"{args.queries} queries, chunk_size={args.chunk_size or 'default'}, torch {torch.__version__}"
    )
    print(f"official all-at-once similarity: {args.candidates * positions**2 * 4 / 2**20:,.0f} MiB")
    print(f"{'device':<8}{'variant':<22}{'ms/query':>12}{'CPU ms':>12}{'peak MiB':>11}")
    for device in args.devices:
        results = {}
        for variant, label in (("vprhub", "vprhub (chunked)"), ("loop", "loop per candidate")):
            queue = context.Queue()
            process = context.Process(target=_run, args=(variant, args, device, queue))
            process.start()
            median, cpu, peak, scores = queue.get()
            process.join()
            results[variant] = (median, scores)
            print(f"{device:<8}{label:<22}{median:>12,.1f}{cpu:>12,.1f}{peak:>11,.1f}")
        same = results["vprhub"][1] == results["loop"][1]
        print(f"{device:<8}speed-up {results['loop'][0] / results['vprhub'][0]:.2f}x, identical scores: {same}")


if __name__ == "__main__":
    main()
