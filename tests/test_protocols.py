"""Named evaluation protocols: data, positives, image size, batch size and precision pinned and reported."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from PIL import Image
from test_evaluation import brute_force_recalls, write_geo_dataset, write_msls, write_npy_lists

import vprhub
from vprhub.cli import main
from vprhub.evaluation.protocols import MODEL_SETTINGS, PROTOCOLS, get_protocol
from vprhub.modeling.image_processing import vpr_image_processor


def test_protocol_table_names_every_required_protocol(capsys):
    required = {"pitts30k-test", "pitts250k-test", "msls-val-740", "msls-val-full", "tokyo247", "nordland-1frame",
                "nordland-10frame", "sped", "sf-xl-v1-test"}
    assert required <= set(PROTOCOLS)
    assert main(["eval", "--list-protocols"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in PROTOCOLS}
    assert set(rows) == set(PROTOCOLS)
    assert "6816" in rows["pitts30k-test"] and "10000" in rows["pitts30k-test"] and "740" in rows["msls-val-740"]
    assert "same frame only" in rows["nordland-1frame"] and "within 10 frames" in rows["nordland-10frame"]
    assert "322x322" in table and "float16" in table and "--infer_batch_size 16 (8 for pitts*" in table
    assert all(f"  {p.name}: {p.source}" in table for p in PROTOCOLS.values())
    # the two MSLS-val protocols read different data; the two Nordland ones different positive rules
    assert (get_protocol("msls-val-740").layout, get_protocol("msls-val-full").layout) == ("npy", "msls")
    assert get_protocol("nordland-1frame").radius is None and get_protocol("nordland-10frame").radius == 25.0


def batched_descriptors(model, paths, size: int, batch_size: int) -> np.ndarray:
    """File order, ``batch_size`` at a time (the official loaders), without vprhub's evaluation code."""
    processor = vpr_image_processor(size, size)
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        with torch.no_grad():
            chunks.append(model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]).descriptors)
    return torch.cat(chunks).numpy()


def test_protocol_pins_settings_and_writes_them_next_to_the_recalls(tmp_path):
    torch.manual_seed(0)
    model = vprhub.build_model("cricavpr", initializer_range=0.1, image_size=[56, 56]).eval()  # batch mode
    model.save_pretrained(tmp_path / "crica")
    vpr_image_processor(56, 56).save_pretrained(tmp_path / "crica")  # the protocol overrides this size
    expected = write_geo_dataset(tmp_path / "data" / "nordland" / "images" / "test")
    out = tmp_path / "out.json"
    data = str(tmp_path / "data")
    argv = ["eval", "--model", str(tmp_path / "crica"), "--protocol", "nordland-10frame", "--root", data]
    assert main([*argv, "--json", str(out), "--no-progress", "--device", "cpu"]) == 0
    entry = json.loads(out.read_text())["datasets"]["nordland-10frame"]
    pinned = entry["protocol"]
    assert pinned["name"] == "nordland-10frame" and pinned["radius"] == 25.0 and pinned["layout"] == "geo"
    assert (pinned["image_size"], pinned["batch_size"], pinned["precision"]) == ([224, 224], 16, "float32")
    assert entry["batch_size"] == 16 and pinned["source"] == get_protocol("nordland-10frame").source
    database = batched_descriptors(model, expected["database"], 224, 16)  # 18 images: batches of 16 and 2
    queries = batched_descriptors(model, expected["queries"], 224, 16)
    reference = brute_force_recalls(database, queries, expected["positives"], (1, 5, 10))
    assert {k: entry[f"recall@{k}"] for k in (1, 5, 10)} == reference
    other_batch = batched_descriptors(model, expected["database"], 224, 8)
    assert np.abs(other_batch - database).max() > 1e-3  # the pinned batch size matters for this model


def test_protocol_refuses_data_that_is_not_its_set_and_unpinned_overrides(tmp_path, capsys):
    torch.manual_seed(0)
    vprhub.build_model("salad", image_size=[56, 56]).save_pretrained(tmp_path / "salad")
    vpr_image_processor(56, 56).save_pretrained(tmp_path / "salad")
    write_geo_dataset(tmp_path / "data" / "pitts30k" / "images" / "test")
    write_npy_lists(tmp_path / "data" / "mapillary", "msls_val", "idx")
    write_msls(tmp_path / "data" / "mapillary_sls")
    base = ["eval", "--model", str(tmp_path / "salad"), "--root", str(tmp_path / "data"), "--no-progress"]
    assert main([*base, "--protocol", "pitts30k-test"]) == 2
    error = capsys.readouterr().err
    assert "has 7 queries (expected 6816) and 18 database images (expected 10000)" in error
    assert "not the pitts30k-test set" in error
    assert main([*base, "--protocol", "msls-val-740"]) == 2  # the lists are read, not the csv layout
    assert re.search(r"has \d+ queries \(expected 740\)", capsys.readouterr().err)
    assert main([*base, "--protocol", "msls-val-full", "--batch-size", "4", "--dtype", "bfloat16"]) == 2
    assert "--batch-size, --dtype cannot be combined with --protocol" in capsys.readouterr().err
    assert main([*base[:-3], "--protocol", "sped", "--no-progress"]) == 2
    assert "--protocol sped needs --root" in capsys.readouterr().err
    assert MODEL_SETTINGS["salad"].image_size == (322, 322) and MODEL_SETTINGS["salad"].precision == "float16"
