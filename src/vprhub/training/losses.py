"""Multi-similarity loss with online mining, as SALAD and CricaVPR train (pytorch-metric-learning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity

from ..modeling.local_matching import local_triplet_loss


@dataclass
class LossOutput:
    """What one batch's loss computation returns.

    Attributes:
        loss: scalar to back-propagate.
        batch_acc: fraction of the (global) batch that anchors no mined positive pair, i.e.
            samples that no longer contribute (SALAD's logged ``b_acc``).
        mined: ``(a1, p, a2, n)`` mined pair indices into the (global) batch.
        batch_size: number of descriptors the miner saw.
    """

    loss: torch.Tensor
    batch_acc: float
    mined: tuple[torch.Tensor, ...]
    batch_size: int


class BatchTooSmallError(ValueError):
    """A batch without any positive pair or without any negative pair: nothing to mine."""


def check_minable(labels: torch.Tensor) -> None:
    """Raise ``BatchTooSmallError`` unless ``labels`` hold two places and one place with two images."""
    _, counts = torch.unique(labels, return_counts=True)
    if len(counts) < 2 or int(counts.max()) < 2:
        raise BatchTooSmallError(
            "batch too small for mining: need at least 2 places and a place with 2 images, "
            f"got {len(labels)} images of {len(counts)} places (counts {counts.tolist()})"
        )


def gather_with_grad(descriptors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every process's batch in rank order; only the local part carries gradients.

    Batches may differ in length across processes (skipped images); they are padded for the
    collective and trimmed after.
    """
    state = PartialState()
    if state.num_processes == 1:
        return descriptors, labels
    sizes = gather(torch.tensor([len(labels)], device=labels.device)).tolist()
    everyone = gather(pad_across_processes(descriptors.detach(), dim=0))
    everyone_labels = gather(pad_across_processes(labels, dim=0))
    longest = max(sizes)
    pieces = [
        descriptors if rank == state.process_index else everyone[rank * longest : rank * longest + size]
        for rank, size in enumerate(sizes)
    ]
    kept = [everyone_labels[rank * longest : rank * longest + size] for rank, size in enumerate(sizes)]
    return torch.cat(pieces), torch.cat(kept)


class MultiSimilarityObjective(torch.nn.Module):
    """``MultiSimilarityLoss(alpha, beta, base, DotProductSimilarity)`` on the pairs mined by
    ``MultiSimilarityMiner(epsilon, CosineSimilarity)``.

    Args:
        alpha, beta, base: multi-similarity loss weights (official: 1, 50, 0).
        epsilon: miner margin (official: 0.1).
        gather_across_processes: mine and compute the loss over the batches of all
            processes (each process back-propagates through its own part only). Multiply the
            loss by the number of processes before ``backward`` so that data-parallel gradient
            averaging yields the gradient of the global-batch loss.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 50.0,
        base: float = 0.0,
        epsilon: float = 0.1,
        gather_across_processes: bool = False,
    ):
        super().__init__()
        self.loss_fn = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, distance=DotProductSimilarity())
        self.miner = miners.MultiSimilarityMiner(epsilon=epsilon, distance=CosineSimilarity())
        self.gather_across_processes = gather_across_processes

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        if self.gather_across_processes:
            descriptors, labels = gather_with_grad(descriptors, labels)
        check_minable(labels)
        descriptors = descriptors.float()
        mined = self.miner(descriptors, labels)
        loss = self.loss_fn(descriptors, labels, mined)
        anchors = torch.unique(mined[0]).numel()
        return LossOutput(loss, 1.0 - anchors / len(labels), mined, len(labels))


def hardest_triplets(
    descriptors: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every image with a positive: its least similar positive and most similar negative
    (cosine of the global descriptors). Returns ``(anchors, positives, negatives)`` indices."""
    check_minable(labels)
    unit = torch.nn.functional.normalize(descriptors.detach().float(), dim=-1)
    similarity = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    anchors = torch.nonzero(positive.any(dim=1)).squeeze(1)
    positives = similarity.masked_fill(~positive, float("inf"))[anchors].argmin(dim=1)
    negatives = similarity.masked_fill(same, float("-inf"))[anchors].argmax(dim=1)
    return anchors, positives, negatives


def local_feature_loss(local_features: torch.Tensor, descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SelaVPR's local mutual-nearest-neighbour triplet loss (mean over triplets) on the hardest
    triplets of a place batch (see ``hardest_triplets``); local features ``[B, h, w, C]``."""
    anchors, positives, negatives = hardest_triplets(descriptors, labels)
    return local_triplet_loss(local_features[anchors], local_features[positives], local_features[negatives])
