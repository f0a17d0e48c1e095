"""Mutual-nearest-neighbour scoring, re-ranking and the SelaVPR local loss against brute-force numpy."""

import numpy as np
import pytest
import torch

import vprhub
from vprhub.modeling.local_matching import (
    local_triplet_loss,
    mutual_nn_matches,
    mutual_nn_scores,
    mutual_nn_similarity,
    rerank,
)


def reference_matches(query: np.ndarray, candidate: np.ndarray) -> list[tuple[int, int]]:
    """Official rule, one pair, plain loops: j is kept when argmax_j' S[argmax_i S[i, j], j'] == j."""
    q, c = query.reshape(-1, query.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    similarity = c.astype(np.float64) @ q.T.astype(np.float64)  # integer-valued inputs: exact
    pairs = []
    for j in range(similarity.shape[1]):
        i = int(np.argmax(similarity[:, j]))  # numpy argmax: first index on ties, like torch
        if int(np.argmax(similarity[i, :])) == j:
            pairs.append((j, i))
    return pairs


def reference_score(query: np.ndarray, candidate: np.ndarray) -> float:
    count = len(reference_matches(query, candidate))
    return 0.0 if count == 1 else float(count)


def reference_similarity(query: np.ndarray, candidate: np.ndarray) -> float:
    """Official trainflag=True similarity: mean matched dot product, or same-position mean if one match."""
    q, c = query.reshape(-1, query.shape[-1]), candidate.reshape(-1, candidate.shape[-1])
    pairs = reference_matches(query, candidate)
    if len(pairs) == 1:
        return float(np.mean(np.sum(q * c, axis=1)))
    return float(np.mean([q[j] @ c[i] for j, i in pairs]))


def integer_maps(count: int, h: int = 12, w: int = 25, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Integer-valued maps: dot products are exact in float32 and ties are frequent. 300 positions
    span several blocks of the blocked similarity, so ties across blocks are exercised too."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(-2, 3, size=(count, h, w, channels)).astype(np.float32))


def unit_maps(count: int, h: int = 7, w: int = 6, channels: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, h, w, channels, generator=generator), dim=-1)


def test_scores_match_brute_force_with_many_ties():
    maps = integer_maps(12)
    query, candidates = maps[0], maps[1:]
    expected = [reference_score(query.numpy(), c.numpy()) for c in candidates]
    assert len(set(expected)) > 2  # a non-trivial mix of counts
    scores = mutual_nn_scores(query, candidates)
    assert scores.dtype == torch.float32
    assert scores.tolist() == expected


def test_scores_match_brute_force_on_unit_maps():
    maps = unit_maps(9, seed=1)
    scores = mutual_nn_scores(maps[0], maps)
    assert scores.tolist() == [reference_score(maps[0].numpy(), c.numpy()) for c in maps]
    assert scores[0] == 7 * 6  # the query against itself: every position is its own match


def test_exactly_one_mutual_match_scores_zero():
    query = unit_maps(1)[0]
    constant = torch.zeros_like(query)
    constant[..., 0] = 1.0  # every position identical: one mutual match only
    assert len(reference_matches(query.numpy(), constant.numpy())) == 1
    assert mutual_nn_scores(query, constant[None]).tolist() == [0.0]
    assert mutual_nn_matches(query, constant).shape == (1, 2)  # the raw match is still reported


def test_positions_are_ignored():
    query = unit_maps(1, seed=2)[0]
    shuffled = query.reshape(-1, query.shape[-1])[torch.randperm(42)].reshape(query.shape)
    assert mutual_nn_scores(query, shuffled[None]).tolist() == [42.0]


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_chunking_does_not_change_scores(chunk_size):
    maps = integer_maps(11, seed=3)
    assert torch.equal(mutual_nn_scores(maps[0], maps[1:], chunk_size=chunk_size), mutual_nn_scores(maps[0], maps[1:]))


def test_flat_and_map_layouts_agree():
    maps = unit_maps(5, seed=4)
    flat = maps.reshape(5, -1, maps.shape[-1])
    assert torch.equal(mutual_nn_scores(flat[0], flat[1:]), mutual_nn_scores(maps[0], maps[1:]))


def test_half_precision_inputs_are_scored_in_float32():
    maps = integer_maps(6, seed=5)
    half = mutual_nn_scores(maps[0].half(), maps[1:].half())
    assert half.dtype == torch.float32
    assert torch.equal(half, mutual_nn_scores(maps[0], maps[1:]))


def test_autocast_does_not_lower_the_matching_precision():
    maps = unit_maps(6, h=15, w=20, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mutual_nn_scores(maps[0], maps[1:])
    assert torch.equal(under_autocast, mutual_nn_scores(maps[0], maps[1:]))


def test_matches_are_the_brute_force_pairs():
    maps = integer_maps(2, seed=6)
    pairs = mutual_nn_matches(maps[0], maps[1])
    assert pairs.dtype == torch.int64
    assert [tuple(p) for p in pairs.tolist()] == reference_matches(maps[0].numpy(), maps[1].numpy())


def test_rerank_orders_by_score_then_global_rank():
    maps = integer_maps(16, seed=7)
    query, candidates = maps[0], maps[1:]
    order, scores = rerank(query, candidates)
    expected_scores = np.array([reference_score(query.numpy(), c.numpy()) for c in candidates], dtype=np.float32)
    assert scores.tolist() == expected_scores.tolist()
    assert len(set(expected_scores.tolist())) < len(expected_scores)  # ties exercised
    assert order.tolist() == np.argsort(-expected_scores, kind="stable").tolist()
    assert order.dtype == torch.int64


def test_rerank_breaks_ties_by_the_given_global_order():
    maps = integer_maps(16, seed=7)
    query, candidates = maps[0], maps[1:]
    global_order = torch.randperm(15, generator=torch.Generator().manual_seed(0))
    order, scores = rerank(query, candidates, global_order=global_order)
    expected_scores = np.array([reference_score(query.numpy(), c.numpy()) for c in candidates], dtype=np.float32)
    ranked = global_order.numpy()[np.argsort(-expected_scores[global_order.numpy()], kind="stable")]
    assert order.tolist() == ranked.tolist()
    assert sorted(order.tolist()) == list(range(15))


def test_rerank_is_the_package_entry_point():
    assert vprhub.rerank is rerank


@pytest.mark.parametrize(
    "query_shape, candidates_shape, message",
    [
        ((7, 6, 16), (3, 7, 6, 8), "differ in shape"),
        ((7, 6, 16), (3, 7, 5, 16), "differ in shape"),
        ((7, 6, 16), (0, 7, 6, 16), "empty candidate list"),
        ((7, 6, 16), (7, 6, 16), r"\[K, 7, 6, 16\]"),
        ((16,), (3, 16), r"\[h, w, C\] or \[N, C\]"),
        ((0, 16), (3, 0, 16), "empty"),
    ],
)
def test_bad_shapes_are_refused(query_shape, candidates_shape, message):
    with pytest.raises(ValueError, match=message):
        mutual_nn_scores(torch.zeros(query_shape), torch.zeros(candidates_shape))


def test_other_bad_inputs_are_refused():
    maps = unit_maps(3)
    with pytest.raises(ValueError, match="floating-point"):
        mutual_nn_scores(maps[0].long(), maps[1:])
    with pytest.raises(ValueError, match="chunk_size"):
        mutual_nn_scores(maps[0], maps[1:], chunk_size=0)
    with pytest.raises(ValueError, match="device"):
        mutual_nn_scores(maps[0].to("meta"), maps[1:])
    with pytest.raises(ValueError, match="permutation"):
        rerank(maps[0], maps[1:], global_order=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="permutation"):
        rerank(maps[0], maps[1:], global_order=torch.tensor([0, 1, 2]))


def test_training_similarity_matches_official_semantics():
    maps = integer_maps(8, seed=8)
    constant = torch.zeros(12, 25, 3)
    constant[..., 0] = 1.0  # one mutual match against anything: the same-position fallback
    queries = torch.stack([maps[0], maps[1], maps[2], maps[3]])
    candidates = torch.stack([maps[4], maps[5], constant, maps[3]])
    expected = [reference_similarity(q.numpy(), c.numpy()) for q, c in zip(queries, candidates)]
    assert len(reference_matches(queries[2].numpy(), candidates[2].numpy())) == 1
    similarity = mutual_nn_similarity(queries, candidates, chunk_size=3)
    np.testing.assert_allclose(similarity.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_local_loss_is_a_hinge_on_similarities_and_trains_both_sides():
    maps = unit_maps(9, seed=9)
    anchor, positive, negative = maps[0:3].clone(), maps[3:6].clone(), maps[6:9].clone()
    for tensor in (anchor, positive, negative):
        tensor.requires_grad_(True)
    sim_p = [reference_similarity(a.detach().numpy(), p.detach().numpy()) for a, p in zip(anchor, positive)]
    sim_n = [reference_similarity(a.detach().numpy(), n.detach().numpy()) for a, n in zip(anchor, negative)]
    for margin in (0.0, 0.1):
        hinge = np.maximum(np.array(sim_n) - np.array(sim_p) + margin, 0.0)
        total = local_triplet_loss(anchor, positive, negative, margin=margin, reduction="sum")
        mean = local_triplet_loss(anchor, positive, negative, margin=margin)
        assert total.item() == pytest.approx(hinge.sum(), abs=1e-6)
        assert mean.item() == pytest.approx(hinge.mean(), abs=1e-6)
    loss = local_triplet_loss(anchor, positive, negative, margin=1.0)
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (anchor, positive, negative))


def test_training_similarity_refuses_unpaired_batches():
    maps = unit_maps(4)
    with pytest.raises(ValueError, match="same shape"):
        mutual_nn_similarity(maps[:2], maps[:3])
    with pytest.raises(ValueError, match="non-empty batch"):
        mutual_nn_similarity(maps[0, 0, 0], maps[0, 0, 0])
    with pytest.raises(ValueError, match="reduction"):
        local_triplet_loss(maps[:1], maps[1:2], maps[2:3], reduction="none")
