"""SALAD aggregation: vprhub's batched matmul vs the straightforward repeat-based sum.

Prints time per call and peak memory for B=64, n=529 patches (322x322 input), ViT-B width,
m=64 clusters of l=128 channels. Each variant runs in its own process so that peak memory
(CPU: growth of the peak resident set; GPU: max allocated above the inputs) is its own.

    python benchmarks/salad_aggregator.py [--batch 64] [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch
from torch import nn

from vprhub.modeling.aggregation import SaladAggregator, sinkhorn_with_dustbin


def repeat_based_forward(agg: SaladAggregator, feature_map: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The textbook version: materialise B x l x m x n, multiply, sum over n."""
    features = agg.cluster_features(feature_map).flatten(2)
    assignment = sinkhorn_with_dustbin(agg.score(feature_map).flatten(2), agg.dust_bin, agg.sinkhorn_iterations)
    clusters, num_clusters = features.shape[1], assignment.shape[1]
    p = assignment.unsqueeze(1).repeat(1, clusters, 1, 1)
    f = features.unsqueeze(2).repeat(1, 1, num_clusters, 1)
    pooled = nn.functional.normalize((f * p).sum(dim=-1), dim=1).flatten(1)
    scene = nn.functional.normalize(agg.token_features(token), dim=-1)
    return nn.functional.normalize(torch.cat((scene, pooled), dim=-1), dim=-1)


def _run(variant: str, batch: int, device: str, repeats: int, train: bool, queue) -> None:
    torch.manual_seed(0)
    agg = SaladAggregator(768, 64, 128, 256, 512, 0.0, 1.0, 3).to(device)
    x = torch.randn(batch, 768, 23, 23, device=device)
    t = torch.randn(batch, 768, device=device)
    forward = (lambda: agg(x, t)[0]) if variant == "vprhub (bmm)" else (lambda: repeat_based_forward(agg, x, t))

    def step():
        if train:
            forward().sum().backward()
        else:
            with torch.no_grad():
                forward()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:  # growth of the peak resident set above what the weights and inputs take
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    queue.put((sorted(times)[len(times) // 2] * 1000, peak_mb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"SALAD aggregator, B={args.batch}, n=529 (322x322), C=768, m=64, l=128, device={args.device}")
    print(f"{'mode':<10}{'variant':<16}{'ms/call':>10}{'peak MiB':>12}")
    for train in (False, True):
        for variant in ("vprhub (bmm)", "repeat"):
            queue = context.Queue()
            proc = context.Process(target=_run, args=(variant, args.batch, args.device, args.repeats, train, queue))
            proc.start()
            ms, peak = queue.get()
            proc.join()
            print(f"{'train' if train else 'infer':<10}{variant:<16}{ms:>10.1f}{peak:>12.0f}")


if __name__ == "__main__":
    main()
