"""SelaVPR's training data: the query/database reader, the cached hard-negative sampler, the triplet loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprhub.data import write_gmberton_benchmark
from vprhub.data.geo_triplets import read_geo_triplets
from vprhub.evaluation import parse_utm
from vprhub.training import DataArguments, ModelArguments, TrainArguments, train
from vprhub.training.triplets import CachedTripletSampler, TripletObjective


@pytest.fixture(scope="module")
def small_map(tmp_path_factory):
    """30 places 150 m apart, two database views and one query view each (views within 3 m of the centre)."""
    root = write_gmberton_benchmark(
        tmp_path_factory.mktemp("map") / "map", 30, database_views=2, query_views=1, image_size=28, split="train"
    )
    return read_geo_triplets(root / "images" / "train")


def _utm(paths) -> np.ndarray:
    return np.asarray([parse_utm(p) for p in paths])


def test_reader_keeps_positives_within_10_m_and_soft_positives_within_25_m(small_map):
    assert (small_map.num_database, small_map.num_queries, small_map.dropped_queries) == (60, 30, 0)
    database, queries = _utm(small_map.database_paths), _utm(small_map.query_paths)
    distances = np.linalg.norm(queries[:, None] - database[None], axis=2)
    for query in range(30):
        assert small_map.hard_positives[query].tolist() == np.flatnonzero(distances[query] <= 10).tolist()
        assert small_map.soft_positives[query].tolist() == np.flatnonzero(distances[query] <= 25).tolist()
        assert len(small_map.hard_positives[query]) == 2  # the two database views of its place


def test_sampler_mines_the_nearest_positive_and_the_hardest_cached_negatives(small_map):
    sampler = CachedTripletSampler(
        small_map, queries_per_batch=2, negatives_per_query=2, negative_samples=20, cache_refresh_rate=6,
        queries_per_epoch=12, seed=3,
    )  # fmt: skip
    features = np.random.default_rng(0).normal(size=(small_map.num_database + small_map.num_queries, 8))
    described = []
    sampler.describe = lambda indices: described.append(indices) or features[indices]
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6 and all(len(batch) == 8 for batch in batches)
    assert len(described) == 2  # one cache per round of 6 queries

    queries, database = sampler.draw(1)
    assert len(set(queries.tolist())) == 6 and len(set(database.tolist())) == 20
    triplets = sampler.last_round["triplets"]
    assert [index for batch in batches[3:] for index, _ in batch] == triplets.reshape(-1).tolist()
    assert set(described[1].tolist()) >= {*database.tolist(), *(60 + queries).tolist()}
    database_utm, query_utm = _utm(small_map.database_paths), _utm(small_map.query_paths)
    for query, (query_index, positive, *negatives) in zip(queries, triplets, strict=True):
        assert query_index == 60 + query
        distance = np.linalg.norm(features[database] - features[query_index], axis=1)
        # The positive: the hard positive nearest in descriptor space, within 10 m on the ground.
        hard = small_map.hard_positives[query]
        assert positive == hard[np.argmin(np.linalg.norm(features[hard] - features[query_index], axis=1))]
        assert np.linalg.norm(database_utm[positive] - query_utm[query]) <= 10
        # The negatives: the two nearest of the sampled database images farther than 25 m.
        far = np.linalg.norm(database_utm[database] - query_utm[query], axis=1) > 25
        expected = database[far][np.argsort(distance[far])[:2]]
        assert negatives == expected.tolist()
        assert all(np.linalg.norm(database_utm[n] - query_utm[query]) > 25 for n in negatives)


def test_sampler_refuses_settings_the_data_cannot_fill(small_map):
    with pytest.raises(ValueError, match="must be a multiple of cache_refresh_rate"):
        CachedTripletSampler(small_map, cache_refresh_rate=4, queries_per_epoch=10, negative_samples=20)
    with pytest.raises(ValueError, match="exceeds the 30 queries"):
        CachedTripletSampler(small_map, cache_refresh_rate=40, queries_per_epoch=40, negative_samples=20)
    with pytest.raises(ValueError, match="exceeds the 60 database images"):
        CachedTripletSampler(small_map, cache_refresh_rate=8, queries_per_epoch=8)


def test_triplet_loss_is_the_mean_margin_violation_in_l2():
    descriptors = torch.nn.functional.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    result = TripletObjective(margin=0.1, negatives_per_query=2)(descriptors)
    values = descriptors.numpy().astype(np.float64)
    violations = []
    for start in (0, 4):  # groups [query, positive, negative, negative]
        query, positive = values[start], values[start + 1]
        for negative in values[start + 2 : start + 4]:
            gap = np.linalg.norm(query - positive) - np.linalg.norm(query - negative) + 0.1
            violations.append(max(gap, 0.0))
    assert result.loss.item() == pytest.approx(np.mean(violations), abs=1e-5)
    assert result.batch_acc == pytest.approx(np.mean(np.asarray(violations) == 0))
    assert [t.tolist() for t in result.mined] == [[0, 0, 4, 4], [1, 1, 5, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match="groups of 4 images"):
        TripletObjective(negatives_per_query=2)(descriptors[:7])


@pytest.mark.usefixtures("isolated_training_run")
def test_selavpr_triplet_recipe_trains_and_validates_after_re_ranking(tmp_path):
    data = DataArguments(
        train_dataset="synthetic", synthetic_places=24, synthetic_views=3, image_size=[56, 56],
        eval_image_size=[56, 56], synthetic_eval_places=8, cache_refresh_rate=8, queries_per_epoch=16,
        negative_samples=16, num_workers=0, rand_augment_ops=0,
    )  # fmt: skip
    args = TrainArguments(
        output_dir=str(tmp_path), loss="triplet", num_train_epochs=1, optimizer="adam", learning_rate=1e-3,
        local_loss_weight=1.0, eval_rerank_num=4, metric_for_best_model="recall@5", save_steps=0,
        disable_tqdm=True, report_to="none",
    )  # fmt: skip
    result = train(ModelArguments(model="selavpr"), data, args)
    # 16 queries per epoch in batches of 4: 4 optimiser steps, each over 4 x (query, positive, 2 negatives).
    assert (result.state.global_step, result.state.epoch) == (4, 1)
    assert result.eval_results["reranked"] is True and "global_recall@1" in result.eval_results
    losses = [entry["loss"] for entry in result.state.log_history if "loss" in entry]
    assert len(losses) == 4 and len(set(losses)) == 4


def test_msls_reader_agrees_with_the_msls_evaluation_reader(tmp_path):
    from test_evaluation import write_msls

    from vprhub.data.geo_triplets import load_geo_triplets, read_msls_triplets
    from vprhub.evaluation import read_msls

    write_msls(tmp_path)  # the validation cities cph and sf only
    with pytest.raises(FileNotFoundError, match="holds none of the MSLS training cities"):
        load_geo_triplets(tmp_path)  # an MSLS root (train_val/) defaults to the training cities
    triplets = read_msls_triplets(tmp_path, ("cph", "sf"))
    within_10 = read_msls(tmp_path, ("cph", "sf"), radius=10)
    within_25 = read_msls(tmp_path, ("cph", "sf"), radius=25)
    assert triplets.database_paths == list(within_10.database_paths) == list(within_25.database_paths)
    assert triplets.query_paths == list(within_10.query_paths)  # queries with a database image within 10 m
    assert [p.tolist() for p in triplets.hard_positives] == [p.tolist() for p in within_10.positives]
    soft = dict(zip(within_25.query_paths, within_25.positives, strict=True))
    assert [p.tolist() for p in triplets.soft_positives] == [soft[q].tolist() for q in triplets.query_paths]
    assert triplets.dropped_queries == within_10.excluded_queries > 0
