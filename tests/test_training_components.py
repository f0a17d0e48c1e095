"""Training parts: P x K sampler, multi-similarity loss (parity), local loss triplets, batches, arguments."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.data_loader import BatchSamplerShard
from parity import load_expected, parity_dir
from safetensors.torch import load_file

import vprhub
from vprhub.data import GSVCities, SyntheticPlaces, write_gsv_cities
from vprhub.data.transforms import RandAugment
from vprhub.modeling.image_processing import vpr_image_processor
from vprhub.training import (
    BatchTooSmallError,
    DataArguments,
    MultiSimilarityObjective,
    PlaceBatchSampler,
    hardest_triplets,
    local_feature_loss,
    parse_args,
)
from vprhub.training.args import apply_backbone_defaults
from vprhub.training.data import AugmentedPlaces, PlaceBatchCollator
from vprhub.training.losses import gather_with_grad



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------- sampler
def _labels() -> np.ndarray:
    # 13 places with 4..7 images, 2 places with fewer than 4, shuffled image order.
    counts = [4, 5, 6, 7, 4, 4, 3, 5, 6, 4, 2, 4, 5, 4, 7]
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(labels)


def test_sampler_batches_are_p_places_by_k_images():
    labels = _labels()
    sampler = PlaceBatchSampler(labels, places_per_batch=3, images_per_place=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13 // 3
    seen = []
    for batch in batches:
        indices = [index for index, _ in batch]
        assert len(indices) == 12 == len(set(indices))
        places = labels[indices].reshape(3, 4)
        assert (places == places[:, :1]).all()  # images of a place are contiguous
        assert len(set(places[:, 0])) == 3
        seen += places[:, 0].tolist()
    assert len(seen) == len(set(seen))  # each place at most once per epoch
    assert not {6, 10} & set(seen)  # places with fewer than K images never appear
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)


def test_sampler_is_a_function_of_seed_and_epoch():
    labels = _labels()
    a, b = PlaceBatchSampler(labels, 3, 4, seed=1), PlaceBatchSampler(labels, 3, 4, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PlaceBatchSampler(labels, 3, 4, seed=2)) != list(PlaceBatchSampler(labels, 3, 4, seed=1))
    keep_last = PlaceBatchSampler(labels, 3, 4, seed=1, drop_last=False)
    assert len(keep_last) == 5 and len(list(keep_last)[-1]) == 4


def test_sampler_keeps_cities_together_when_given_groups():
    labels = np.repeat(np.arange(12), 4)
    cities = np.repeat([2, 0, 1], 16)  # places 0-3 in city 2, 4-7 in city 0, 8-11 in city 1
    sampler = PlaceBatchSampler(labels, 2, 4, seed=5, groups=cities)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        places = [labels[index] for batch in sampler for index, _ in batch][::4]
        assert [cities[4 * place] for place in places] == [0] * 4 + [1] * 4 + [2] * 4
    assert places != sorted(places)  # shuffled within each city


def test_sampler_can_keep_one_place_order_for_every_epoch():
    labels = np.repeat(np.arange(12), 4)
    sampler = PlaceBatchSampler(labels, 3, 4, seed=5, reshuffle_places=False)
    orders, images = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        orders.append([labels[index] for batch in batches for index, _ in batch][::4])
        images.append([index for batch in batches for index, _ in batch])
    assert orders[0] == orders[1] == orders[2] and orders[0] != sorted(orders[0])
    assert images[0] != images[1]  # the images of each place are still drawn anew


def test_gsv_cities_are_read_in_the_official_order(tmp_path):
    cities = {"PRS": 2, "Zagreb": 2, "Bangkok": 2, "Aachen": 2, "Osaka": 2}
    write_gsv_cities(tmp_path / "gsv", cities, views_per_place=4, image_size=16)
    # The official list order (Bangkok ... Osaka, PRS), then cities it does not know, alphabetically.
    assert GSVCities(tmp_path / "gsv").cities == ["Bangkok", "Osaka", "PRS", "Aachen", "Zagreb"]


def test_tiny_backbone_brings_settings_that_learn_and_explicit_values_win():
    model_args, data_args, args = parse_args(["--model", "salad", "--output_dir", "o"])
    apply_backbone_defaults(model_args, data_args, args)
    assert (data_args.image_size, data_args.eval_image_size, data_args.places_per_batch, args.learning_rate) == (
        [56, 56], [56, 56], 8, 1e-3,
    )  # fmt: skip
    argv = ["--model", "salad", "--output_dir", "o", "--backbone", "facebook/dinov2-base", "--learning_rate", "2e-5"]
    model_args, data_args, args = parse_args(argv)
    apply_backbone_defaults(model_args, data_args, args)
    assert (data_args.image_size, data_args.eval_image_size, data_args.places_per_batch, args.learning_rate) == (
        [224, 224], None, 60, 2e-5,
    )  # fmt: skip
    model_args, data_args, args = parse_args(["--model", "selavpr", "--output_dir", "o"])
    apply_backbone_defaults(model_args, data_args, args)
    assert (data_args.image_size, args.learning_rate) == ([56, 56], 1e-2)  # adapters only: a larger step
    assert 1 <= DataArguments().num_workers <= min(4, os.cpu_count())


def test_sampler_shards_across_processes_like_accelerate():
    labels = np.repeat(np.arange(20), 4)
    sampler = PlaceBatchSampler(labels, 2, 4, seed=3)
    single = list(sampler)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    assert [batch for pair in zip(*shards, strict=True) for batch in pair] == single
    assert all(len(batch) == 8 for shard in shards for batch in shard)


def test_sampler_rejects_batches_too_small_for_mining():
    with pytest.raises(ValueError, match="at least 2 places per batch and 2 images per place"):
        PlaceBatchSampler(np.repeat(np.arange(5), 4), places_per_batch=1, images_per_place=4)
    with pytest.raises(ValueError, match="images_per_place=1"):
        PlaceBatchSampler(np.repeat(np.arange(5), 4), places_per_batch=4, images_per_place=1)
    with pytest.raises(ValueError, match="only 2 places have at least 4 images"):
        PlaceBatchSampler(np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]), places_per_batch=3, images_per_place=4)


# --------------------------------------------------------------------------- loss
def test_multi_similarity_matches_the_official_fixture():
    inputs = load_file(str(parity_dir() / "loss" / "inputs.safetensors"))
    expected = load_expected("loss")
    objective = MultiSimilarityObjective()
    result = objective(inputs["descriptors"], inputs["labels"])
    torch.testing.assert_close(result.loss.reshape(1), expected["loss"], atol=1e-6, rtol=0)
    for name, mined in zip(("mined.a1", "mined.p", "mined.a2", "mined.n"), result.mined, strict=True):
        assert torch.equal(mined, expected[name]), name
    assert result.batch_acc == expected["batch_acc"].item()
    assert result.batch_size == 24
    all_pairs = objective.loss_fn(inputs["descriptors"], inputs["labels"])
    torch.testing.assert_close(all_pairs.reshape(1), expected["loss_without_miner"], atol=1e-6, rtol=0)


def test_loss_has_gradients_and_rejects_unminable_batches():
    descriptors = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    result = MultiSimilarityObjective()(descriptors, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    result.loss.backward()
    assert descriptors.grad.abs().sum() > 0
    with pytest.raises(BatchTooSmallError, match="batch too small for mining"):
        MultiSimilarityObjective()(descriptors, torch.zeros(8, dtype=torch.long))
    with pytest.raises(BatchTooSmallError, match="counts"):
        MultiSimilarityObjective()(descriptors, torch.arange(8))


def test_gather_with_grad_is_the_identity_on_one_process():
    descriptors, labels = torch.randn(4, 3), torch.arange(4)
    gathered, gathered_labels = gather_with_grad(descriptors, labels)
    assert gathered is descriptors and gathered_labels is labels


def test_hardest_triplets_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    descriptors = torch.randn(12, 5, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
    anchors, positives, negatives = hardest_triplets(descriptors, labels)
    unit = descriptors / descriptors.norm(dim=1, keepdim=True)
    expected = []
    for i in range(12):
        others = [j for j in range(12) if j != i and labels[j] == labels[i]]
        if not others:
            continue
        cos = {j: float(unit[i] @ unit[j]) for j in range(12)}
        expected.append(
            (i, min(others, key=cos.get), max((j for j in range(12) if labels[j] != labels[i]), key=cos.get))
        )
    assert list(zip(anchors.tolist(), positives.tolist(), negatives.tolist(), strict=True)) == expected


def test_local_feature_loss_trains_the_selavpr_local_head():
    model = vprhub.build_model("selavpr")
    outputs = model(pixel_values=torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1)))
    loss = local_feature_loss(outputs.local_features, outputs.descriptors, torch.tensor([0, 0, 1, 1]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    (loss + outputs.descriptors.sum()).backward()
    assert all(p.grad is not None for p in model.local_head.parameters())


# ------------------------------------------------------------------------ batches
def test_augmented_batches_are_seeded_and_normalised_like_the_processor():
    places = SyntheticPlaces(3, 2, (32, 48), seed=0)
    dataset = AugmentedPlaces(places, (28, 42), RandAugment(num_ops=3))
    first, again, other = dataset[(4, 123)], dataset[(4, 123)], dataset[(4, 124)]
    assert first["image"].size == (42, 28) and first["place_id"] == 2
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))
    assert not np.array_equal(np.asarray(first["image"]), np.asarray(other["image"]))

    processor = vpr_image_processor(28, 42)
    samples = [dataset[(i, i)] for i in range(4)] + [{"image": None, "place_id": 1, "unreadable": (9, "gone")}]
    batch = PlaceBatchCollator(processor)(samples)
    expected = processor(images=[s["image"] for s in samples[:4]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-5, rtol=0)
    assert batch["labels"].tolist() == [0, 0, 1, 1] and batch["num_skipped"].item() == 1
    assert batch["unreadable"] == [(9, "gone")]


def test_unreadable_images_become_skipped_samples(tmp_path):
    class Broken(SyntheticPlaces):
        def load_image(self, index):
            if index == 1:
                raise OSError("image file is truncated")
            return super().load_image(index)

    dataset = AugmentedPlaces(Broken(2, 2, 16), (14, 14))
    batch = PlaceBatchCollator(vpr_image_processor(14, 14))([dataset[(i, 0)] for i in range(4)])
    assert batch["pixel_values"].shape == (3, 3, 14, 14)
    assert batch["labels"].tolist() == [0, 1, 1] and batch["num_skipped"].item() == 1
    assert batch["unreadable"] == [(1, "image file is truncated")]


def test_rand_augment_rejects_bad_magnitude():
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=31)


# ---------------------------------------------------------------------- arguments
def test_arguments_from_command_line_and_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "cricavpr", "output_dir": "out", "places_per_batch": 6}))
    model_args, data_args, args = parse_args(
        [
            "--config",
            str(config),
            "--places_per_batch",
            "5",
            "--image_size",
            "56",
            "70",
            "--config_overrides",
            "num_trainable_blocks=2,pos_embed_rule=transformers",
        ]
    )
    assert (model_args.model, data_args.places_per_batch, data_args.image_size, args.output_dir) == (
        "cricavpr",
        5,
        [56, 70],
        "out",
    )
    assert model_args.overrides() == {"num_trainable_blocks": 2, "pos_embed_rule": "transformers"}
    assert data_args.eval_dataset == "synthetic"  # the default when training on synthetic places
    assert DataArguments(eval_dataset="none").eval_dataset is None
    assert DataArguments(train_dataset="gsv").eval_dataset is None
    json_config = tmp_path / "run.json"
    json_config.write_text('{"model": "salad", "output_dir": "o", "optimizer": "sgd"}')
    assert parse_args(["--config", str(json_config)])[2].optimizer == "sgd"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--model", "netvlad", "--output_dir", "o"],
            "unknown model 'netvlad'; choose one of salad, selavpr, cricavpr, megaloc",
        ),
        (["--output_dir", "o"], "--model is required"),
        (["--model", "salad"], "--output_dir is required"),
        (["--model", "salad", "--output_dir", "o", "--places_per_batch", "1"], "batch too small for mining"),
        (["--model", "salad", "--output_dir", "o", "--image_size", "224"], "two positive numbers"),
        (["--model", "salad", "--output_dir", "o", "--metric_for_best_model", "loss"], "recall@K"),
        (["--model", "salad", "--output_dir", "o", "--config_overrides", "dropout"], "key=value"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_args, _, _ = parse_args(argv)
        model_args.overrides()


def test_bad_config_files(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("model: salad\noutput_dir: o\noptimiser: adam\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['optimiser'\]"):
        parse_args(["--config", str(bad_key)])
    bad_choice = tmp_path / "b.yaml"
    bad_choice.write_text("model: salad\noutput_dir: o\nmixed_precision: fp8\n")
    with pytest.raises(ValueError, match="--mixed_precision must be one of"):
        parse_args(["--config", str(bad_choice)])
    with pytest.raises(FileNotFoundError):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_megaloc_recipe_trains_every_block_with_salads_loss():
    model_args, data_args, args = parse_args(["--config", str(Path(__file__).resolve().parents[1] / "training" / "megaloc.yaml")])
    assert (model_args.model, model_args.backbone, model_args.overrides()) == ("megaloc", "facebook/dinov2-base", {})
    assert (data_args.images_per_place, data_args.image_size) == (4, [224, 224])
    assert (args.ms_alpha, args.ms_beta, args.ms_base, args.miner_epsilon) == (1.0, 50.0, 0.0, 0.1)
