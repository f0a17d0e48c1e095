"""Training data: the synthetic-places generator and the GSV-Cities / `datasets` readers."""

from __future__ import annotations

import csv
import logging
import pickle

import datasets
import numpy as np
import pytest
from PIL import Image

from vprhub.data import (
    UNREADABLE_IMAGE_ERRORS,
    GSVCities,
    HFPlaces,
    SyntheticPlaces,
    drop_small_places,
    gsv_cities_image_name,
    load_places,
    write_gmberton_benchmark,
    write_gsv_cities,
)
from vprhub.evaluation import load_test_set


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------- synthetic places
def test_synthetic_is_deterministic_and_seed_dependent():
    first, again = SyntheticPlaces(3, 2, (40, 56), seed=7), SyntheticPlaces(3, 2, (40, 56), seed=7)
    other = SyntheticPlaces(3, 2, (40, 56), seed=8)
    for index in range(len(first)):
        assert first[index]["image"].size == (56, 40)
        assert np.array_equal(_pixels(first[index]["image"]), _pixels(again[index]["image"]))
        assert np.abs(_pixels(first[index]["image"]) - _pixels(other[index]["image"])).mean() > 10
    np.testing.assert_array_equal(first.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(first.utm, again.utm)


def test_synthetic_views_differ_but_share_the_scene():
    places = SyntheticPlaces(6, 3, 64, seed=0)
    images = np.stack([_pixels(places[i]["image"]) for i in range(len(places))]).astype(np.float64)
    # Coarse layout (8x8 mean colours, per-image standardised): views of a place are
    # closer to each other than to views of other places, on average.
    coarse = images.reshape(len(images), 8, 8, 8, 8, 3).mean(axis=(2, 4)).reshape(len(images), -1)
    coarse = (coarse - coarse.mean(1, keepdims=True)) / coarse.std(1, keepdims=True)
    distance = np.linalg.norm(coarse[:, None] - coarse[None], axis=-1)
    same = places.labels[:, None] == places.labels[None]
    off_diagonal = ~np.eye(len(images), dtype=bool)
    assert distance[same & off_diagonal].mean() < 0.8 * distance[~same].mean()
    assert (distance[same & off_diagonal] > 0).all()  # no two views are identical


def test_synthetic_utm_layout_separates_places_at_25_metres():
    places = SyntheticPlaces(30, 4, 16, seed=3)
    distance = np.linalg.norm(places.utm[:, None] - places.utm[None], axis=-1)
    same = places.labels[:, None] == places.labels[None]
    assert distance[same].max() <= 6.0
    assert distance[~same].min() >= 100.0


def test_synthetic_difficulty_zero_keeps_the_viewpoint():
    places = SyntheticPlaces(2, 2, 48, seed=1, max_occluders=0, difficulty=0.0)
    np.testing.assert_array_equal(_pixels(places[0]["image"]), _pixels(places[1]["image"]))
    hard = SyntheticPlaces(2, 2, 48, seed=1, max_occluders=0)
    assert not np.array_equal(_pixels(hard[0]["image"]), _pixels(hard[1]["image"]))


def test_synthetic_pickles_for_worker_processes():
    places = SyntheticPlaces(2, 2, 16, seed=4)
    copy = pickle.loads(pickle.dumps(places))
    assert np.array_equal(_pixels(copy[3]["image"]), _pixels(places[3]["image"]))


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_places"):
        SyntheticPlaces(0, 2)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticPlaces(2, 2, image_size=4)


def test_synthetic_as_hf_dataset():
    places = SyntheticPlaces(3, 2, 24, seed=2)
    dataset = places.to_hf_dataset()
    assert dataset.column_names == ["image", "place_id", "view", "utm_east", "utm_north"]
    assert dataset["place_id"][:] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_allclose(dataset["utm_east"][:], places.utm[:, 0])
    assert np.array_equal(_pixels(dataset[3]["image"].convert("RGB")), _pixels(places[3]["image"]))


def test_gmberton_benchmark_positives_are_the_same_place(tmp_path):
    root = write_gmberton_benchmark(tmp_path / "bench", num_places=12, database_views=2, query_views=1, image_size=24)
    names = sorted(p.name for p in (root / "images/test/database").iterdir())
    assert len(names) == 24 and all(n.startswith("@") and n.endswith("@.jpg") for n in names)
    test_set = load_test_set(root / "images" / "test")
    assert (test_set.num_database, test_set.num_queries) == (24, 12)
    for query, positives in zip(test_set.query_paths, test_set.positives, strict=True):
        place = query.name.split("@")[7][:-4]  # panoid "s1p000003v002" -> "s1p000003"
        assert sorted(test_set.database_paths[i].name.split("@")[7][:-4] for i in positives) == [place, place]
    with pytest.raises(FileExistsError):
        write_gmberton_benchmark(root, num_places=2, image_size=24)


# ----------------------------------------------------------------------- GSV-Cities
def test_gsv_cities_file_name_follows_the_official_convention():
    row = {
        "place_id": "500012",
        "year": "2017",
        "month": "3",
        "northdeg": "5",
        "city_id": "Rome",
        "lat": "41.90",
        "lon": "12.5",
        "panoid": "abcXYZ",
    }
    assert gsv_cities_image_name(row) == "Rome_0000012_2017_03_005_41.9_12.5_abcXYZ.jpg"


def test_gsv_cities_round_trip_and_small_places(tmp_path, caplog):
    root = write_gsv_cities(tmp_path / "gsv", cities={"Alpha": 3, "Beta": 2}, views_per_place=4, image_size=24)
    places = GSVCities(root, min_images_per_place=4)
    assert (len(places), places.num_places, places.dropped_places) == (20, 5, 0)
    assert np.bincount(places.labels).tolist() == [4] * 5
    assert places.groups.tolist() == [0] * 12 + [1] * 8  # city of every image, in `cities` order
    assert places[0]["image"].size == (24, 24)

    # A third city whose second place has only two images: dropped, counted and logged.
    (root / "Images" / "Gamma").mkdir()
    rows = [
        {
            "place_id": p,
            "year": 2020,
            "month": 1,
            "northdeg": 0,
            "city_id": "Gamma",
            "lat": 1.5,
            "lon": 2.5,
            "panoid": f"g{p}{v}",
        }
        for p, views in ((0, 4), (1, 2))
        for v in range(views)
    ]
    for row in rows:
        Image.new("RGB", (24, 24)).save(root / "Images" / "Gamma" / gsv_cities_image_name(row))
    with open(root / "Dataframes" / "Gamma.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with caplog.at_level(logging.WARNING):
        places = GSVCities(root, min_images_per_place=4)
    assert (places.num_places, places.dropped_places, places.dropped_images) == (6, 1, 2)
    assert "dropped 1 places (2 images) with fewer than 4 images" in caplog.text
    assert "dropped 1 places" in repr(places)
    relaxed = load_places(root, min_images_per_place=2)
    assert (relaxed.num_places, relaxed.dropped_places) == (7, 0)


def test_gsv_cities_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <city>.csv"):
        GSVCities(tmp_path)
    (tmp_path / "Dataframes").mkdir()
    (tmp_path / "Dataframes" / "Oslo.csv").write_text("place_id,year,month\n1,2020,1\n")
    with pytest.raises(
        ValueError, match=r"Oslo.csv: missing columns \['city_id', 'lat', 'lon', 'northdeg', 'panoid'\]"
    ):
        GSVCities(tmp_path)
    with pytest.raises(FileNotFoundError, match="Paris.csv"):
        GSVCities(tmp_path, cities=["Paris"])


def test_gsv_cities_bad_rows_name_the_file_and_line(tmp_path):
    header = "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"
    good = "0,2010,1,0,Oslo,45.0,9.0,pano0\n"
    csv = tmp_path / "Dataframes" / "Oslo.csv"
    csv.parent.mkdir()
    cases = {
        "abc,2010,1,0,Oslo,45.0,9.0,p": r"line 3: invalid literal for int\(\) with base 10: 'abc'",
        "0,2010,1,0,Oslo,,9.0,p": "line 3: could not convert string to float: ''",
        "0,2010,1": "line 3: ",
        "0,2010,1,0,../../etc,45.0,9.0,p": r"line 3: city_id '../../etc' and panoid 'p' must be plain names",
        "0,2010,1,0,..,45.0,9.0,p": r"line 3: city_id '..' and panoid 'p' must be plain names",
        "0,2010,1,0,Oslo,45.0,9.0,../../x": r"line 3: city_id 'Oslo' and panoid '../../x' must be plain names",
    }
    for row, message in cases.items():
        csv.write_text(header + good + row + "\n")
        with pytest.raises(ValueError, match=f"Oslo.csv {message}"):
            GSVCities(tmp_path, min_images_per_place=1)
    csv.write_bytes((header + good.replace("pano0", "pano\xe9")).encode("latin-1"))
    with pytest.raises(ValueError, match=r"Oslo.csv: unreadable as a UTF-8 CSV file \('utf-8' codec can't decode"):
        GSVCities(tmp_path, min_images_per_place=1)
    csv.write_bytes(header.encode() + b"0,2010,1,0,Oslo,45.0,9.0," + b"p" * 200_000 + b"\n")
    with pytest.raises(ValueError, match=r"Oslo.csv: unreadable as a UTF-8 CSV file \(field larger than field limit"):
        GSVCities(tmp_path, min_images_per_place=1)


def test_gsv_cities_missing_and_corrupt_images_raise_when_loaded(tmp_path):
    root = write_gsv_cities(tmp_path / "gsv", cities={"Alpha": 2}, views_per_place=2, image_size=24)
    places = GSVCities(root, min_images_per_place=2)
    (root / "Images" / places.paths[0]).unlink()
    (root / "Images" / places.paths[1]).write_bytes(b"not a jpeg")
    truncated = root / "Images" / places.paths[2]
    truncated.write_bytes(truncated.read_bytes()[:200])
    for index in range(3):
        with pytest.raises(UNREADABLE_IMAGE_ERRORS):
            places.load_image(index)
    assert places.load_image(3).size == (24, 24)


def test_drop_small_places_renumbers_in_order():
    kept, labels, dropped = drop_small_places(np.array([5, 9, 5, 7, 9, 5, 7, 7]), 3)
    np.testing.assert_array_equal(kept, [0, 2, 3, 5, 6, 7])
    np.testing.assert_array_equal(labels, [0, 0, 1, 0, 1, 1])
    assert dropped == 1


# ------------------------------------------------------------------------ datasets
def test_hf_places_string_labels_and_corrupt_images(caplog):
    images = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(7)]
    dataset = datasets.Dataset.from_dict(
        {"photo": images, "where": ["b", "a", "b", "a", "c", "a", "b"]},
        features=datasets.Features({"photo": datasets.Image(), "where": datasets.Value("string")}),
    )
    with caplog.at_level(logging.WARNING):
        places = HFPlaces(dataset, label_column="where", min_images_per_place=2)
    assert "dropped 1 places (1 images)" in caplog.text
    np.testing.assert_array_equal(places.labels, [1, 0, 1, 0, 0, 1])  # "a" -> 0, "b" -> 1; "c" dropped
    assert places[5]["image"].getpixel((0, 0)) == (120, 0, 0)  # row 6 of the original

    broken = dataset.cast_column("photo", datasets.Image(decode=False)).map(
        lambda row, i: {"photo": {"bytes": b"garbage", "path": None} if i == 0 else row["photo"]}, with_indices=True
    )
    places = HFPlaces(broken.cast_column("photo", datasets.Image()), label_column="where", min_images_per_place=2)
    with pytest.raises(UNREADABLE_IMAGE_ERRORS):
        places.load_image(0)
    assert places.load_image(1).size == (8, 8)


def test_hf_places_finds_columns_and_explains_missing_ones():
    images = [Image.new("RGB", (4, 4))] * 2
    dataset = datasets.Dataset.from_dict({"image": images, "place_id": [0, 0]}).cast_column("image", datasets.Image())
    assert HFPlaces(dataset).num_places == 1
    with pytest.raises(ValueError, match="no place-label column"):
        HFPlaces(dataset.remove_columns("place_id"))
    with pytest.raises(ValueError, match="no image column"):
        HFPlaces(dataset.remove_columns("image"))


def test_load_places_from_image_folder_and_saved_dataset(tmp_path):
    for place in ("north", "south"):
        (tmp_path / "folder" / place).mkdir(parents=True)
        for view in range(3):
            Image.new("RGB", (8, 8), (view, 0, 0)).save(tmp_path / "folder" / place / f"{view}.png")
    from_folder = load_places(tmp_path / "folder", min_images_per_place=3)
    assert (len(from_folder), from_folder.num_places) == (6, 2)
    assert np.bincount(from_folder.labels).tolist() == [3, 3]

    SyntheticPlaces(4, 3, 16).to_hf_dataset().save_to_disk(str(tmp_path / "saved"))
    saved = load_places(tmp_path / "saved", min_images_per_place=3)
    assert (len(saved), saved.num_places) == (12, 4)
    assert isinstance(load_places("synthetic", synthetic_places=5, synthetic_views=2, image_size=16), SyntheticPlaces)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_places(tmp_path / "nowhere")
