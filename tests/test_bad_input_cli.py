"""The ``vprhub`` command on user errors: one clear line on stderr, a non-zero exit, no Python
traceback, and nothing of the user's deleted (each case runs the CLI in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vprhub
from test_bad_input import _Payload  # unpickling it runs os.system (a hostile pytorch_model.bin)
from vprhub.data.synthetic import SyntheticPlaces, write_gmberton_benchmark

REPO = Path(__file__).resolve().parents[1]
MODEL_INPUT = [56, 56]


def run_cli(*args: str, cwd: Path, program: tuple[str, ...] = ("-m", "vprhub.cli")) -> subprocess.CompletedProcess:
    """Run vprhub (this checkout's sources) offline: nothing may reach the network."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, *program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``model/`` (a tiny SALAD folder) and ``photos/`` (4 images) in one folder."""
    root = tmp_path_factory.mktemp("workspace")
    torch.manual_seed(0)
    model = vprhub.build_model("salad", image_size=MODEL_INPUT)
    model.save_pretrained(root / "model")
    vprhub.vpr_image_processor(*MODEL_INPUT).save_pretrained(root / "model")
    SyntheticPlaces(num_places=2, views_per_place=2, image_size=56, seed=3).save_images(root / "photos")
    return root


def _photos(workspace: Path) -> list[str]:
    return sorted(str(p.relative_to(workspace)) for p in (workspace / "photos").rglob("*") if p.is_file())


def test_index_build_never_overwrites_its_own_images(workspace):
    before = _photos(workspace)
    result = run_cli(
        "index", "build", "--model", "model", "--images", "photos", "--out", "photos", "--overwrite", cwd=workspace
    )
    assert_user_error(result, "refusing to write photos: it holds the input photos")
    assert _photos(workspace) == before and len(before) == 4


def test_index_build_overwrite_refuses_a_folder_it_did_not_write(workspace, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    result = run_cli(
        "index", "build", "--model", str(workspace / "model"), "--images", str(workspace / "photos"),
        "--out", str(tmp_path / "notes"), "--overwrite", cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(result, "is not a vprhub place index", "--overwrite only replaces what vprhub wrote")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_demo_overwrite_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"holiday")
    result = run_cli("demo", "--out", "photos", "--overwrite", cwd=tmp_path)
    assert_user_error(result, "refusing to replace photos: it is not a vprhub demo folder")
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"holiday"


def test_demo_names_every_picture_after_the_printed_place(tmp_path):
    result = run_cli("demo", "--out", "d", "--places", "4", "--steps", "0", "--queries", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    drawn = [line.split("drawn in ")[1] for line in result.stdout.splitlines() if "drawn in" in line]
    printed = [line.split("query of place ")[1].split()[0] for line in result.stdout.splitlines() if "query of" in line]
    assert drawn == [f"d/matches_{place}.png" for place in printed]
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == sorted(Path(d).name for d in drawn)
    assert len(set(printed)) == 2
    # what the demo wrote, it replaces
    again = run_cli("demo", "--out", "d", "--places", "4", "--steps", "0", "--queries", "2", "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def _official_salad_checkpoint(path: Path) -> None:
    from parity import load_manifest, regenerate_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(regenerate_weights(load_manifest("salad")), path)


def test_convert_overwrite_keeps_the_checkpoint_folder(tmp_path):
    _official_salad_checkpoint(tmp_path / "dir" / "salad.ckpt")
    result = run_cli("convert", "salad", "dir/salad.ckpt", "dir", "--overwrite", cwd=tmp_path)
    assert_user_error(result, "refusing to write dir: it holds the input dir/salad.ckpt")
    assert (tmp_path / "dir" / "salad.ckpt").is_file()


def test_missing_local_model_folder_is_reported_not_looked_up(workspace, tmp_path):
    result = run_cli("index", "build", "--model", "./runs/salad", "--images", str(workspace / "photos"),
                     "--out", "map.vprindex", cwd=tmp_path)  # fmt: skip
    assert_user_error(result, "--model ./runs/salad not found: no such file or folder")
    assert "huggingface.co" not in result.stderr


def test_unknown_hub_model_offline_is_one_line(workspace, tmp_path):
    result = run_cli("index", "build", "--model", "someone/no-such-model", "--images", str(workspace / "photos"),
                     "--out", "map.vprindex", cwd=tmp_path)  # fmt: skip
    assert_user_error(result, "cannot open --model someone/no-such-model as a Hub id (no local folder of that name)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_search_works_from_another_directory(workspace, tmp_path):
    """The index records the model by absolute path: a search from elsewhere needs no --model."""
    built = run_cli("index", "build", "--model", "model", "--images", "photos", "--out", str(tmp_path / "map.vprindex"),
                    "--quiet", cwd=workspace)  # fmt: skip
    assert built.returncode == 0, built.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    query = next((workspace / "photos").rglob("*.jpg"))
    found = run_cli("search", str(query), "--index", str(tmp_path / "map.vprindex"), "--top-k", "1", cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    assert f"query {query}" in found.stdout and "1.0000" in found.stdout  # the image finds itself


def test_search_reports_a_recorded_model_that_is_gone(workspace, tmp_path):
    from vprhub.pipelines import PlaceIndex

    index = PlaceIndex(4, identity={"name_or_path": str(tmp_path / "gone" / "model"), "model_type": "salad"})
    index.add(np.eye(4, dtype=np.float32))
    index.save(tmp_path / "map.vprindex")
    query = next((workspace / "photos").rglob("*.jpg"))
    result = run_cli("search", str(query), "--index", "map.vprindex", cwd=tmp_path)
    gone = tmp_path / "gone" / "model"
    assert_user_error(result, f"the model recorded in map.vprindex {gone} not found: no such file or folder")


def test_eval_refuses_a_pickled_payload_in_a_dataset_file(workspace, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    np.save(tmp_path / "x_dbImages.npy", np.array(["a.jpg"]))
    np.save(tmp_path / "x_qImages.npy", np.array(["b.jpg"]))
    gt = np.empty(1, dtype=object)
    gt[0] = Payload()
    np.save(tmp_path / "x_gt.npy", gt, allow_pickle=True)
    result = run_cli("eval", "--model", str(workspace / "model"), "--dataset", "x_dbImages.npy", cwd=tmp_path)
    assert_user_error(result, "x_gt.npy is not a readable .npy file", "refusing its pickled content")
    assert not (tmp_path / "pwned").exists()


def test_eval_missing_model_folder(tmp_path):
    write_gmberton_benchmark(tmp_path / "bench", num_places=2, image_size=24)
    result = run_cli("eval", "--model", "../nowhere/model", "--dataset", "bench/images/test", cwd=tmp_path)
    assert_user_error(result, "model ../nowhere/model not found: no such file or folder")


def test_train_missing_relative_dataset_is_reported(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_cli("--model", "salad", "--backbone", "tiny", "--train_dataset", "data/places", "--output_dir", "out",
                     cwd=tmp_path, program=(str(REPO / "train.py"),))  # fmt: skip
    assert_user_error(result, "training data data/places not found: no such file or folder")


def test_convert_head_count_that_does_not_divide_the_width(tmp_path):
    _official_salad_checkpoint(tmp_path / "salad.ckpt")
    result = run_cli("convert", "salad", "salad.ckpt", "out", "--num-heads", "5", cwd=tmp_path)
    assert_user_error(result, "5 attention heads do not divide the ViT width 384")
    assert not (tmp_path / "out").exists()


def test_output_cut_short_by_the_reader_is_not_an_error(tmp_path):
    """`vprhub eval --list-protocols | head -1`: the reader closes the pipe early."""
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with subprocess.Popen(
        [sys.executable, "-m", "vprhub.cli", "eval", "--list-protocols"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    ) as process:  # fmt: skip
        process.stdout.read(1)
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


# ---------------------------------------------------------------------- index build / search, in process
def vprhub_main(capsys, *args: str) -> tuple[int, str, str]:
    """``vprhub ARGS`` in this process (fast): exit status, stdout, stderr."""
    from vprhub.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return status, out, err


def _build(workspace: Path, out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--model", str(workspace / "model"), "--images", str(workspace / "photos"),
            "--out", str(out), "--num-workers", "0", "--quiet", *extra]  # fmt: skip


def test_index_build_overwrite_refuses_a_lookalike_index(workspace, tmp_path, capsys):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "vprindex.json").write_text('{"format": "vprhub-place-index"}')
    (fake / "notes.txt").write_text("precious")
    status, _, err = vprhub_main(capsys, *_build(workspace, fake, "--overwrite"))
    assert status == 2 and "is not a vprhub place index" in err
    assert (fake / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,lat,lon\n{name},1\n", "meta.csv line 2: fewer cells than the 3 columns"),
        ('path,lat\n"{name},1\n', "meta.csv line 2: malformed CSV (unexpected end of data)"),
        ("path,note\n{name}," + "a" * 200_000 + "\n", "meta.csv line 2: malformed CSV (field larger than field limit"),
        (b"path,city\n{name},M\xfcnchen\n", "meta.csv is not UTF-8 text"),
        ("path,lat,lat\n{name},1,2\n", "meta.csv: columns ['lat'] appear more than once"),
        ("path,lat\nelsewhere.jpg,1\n", "no row of"),
        (None, "--metadata meta.csv not found"),
        ("path,,lat\n{name},x,1\n", "meta.csv: column 2 has no name"),
        ("<a folder>", "--metadata meta.csv is a folder, not a CSV file"),
    ],
)
def test_metadata_csv_problems_are_one_line(workspace, tmp_path, capsys, monkeypatch, content, message):
    name = Path(_photos(workspace)[0]).name
    if content == "<a folder>":
        (tmp_path / "meta.csv").mkdir()
    elif isinstance(content, bytes):
        (tmp_path / "meta.csv").write_bytes(content.replace(b"{name}", name.encode()))
    elif content is not None:
        (tmp_path / "meta.csv").write_text(content.replace("{name}", name), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / "map.vprindex", "--metadata", "meta.csv"))
    assert status == 2 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["meta.csv"] if content is not None else [])


def test_excel_csv_with_byte_order_mark_is_read(workspace, tmp_path, capsys):
    from vprhub.pipelines import PlaceIndex

    names = [Path(p).name for p in _photos(workspace)]
    rows = "".join(f"{n},{i}.5,{i}\n" for i, n in enumerate(names[:2]))
    (tmp_path / "meta.csv").write_text("\ufeffpath,lat,lon\n" + rows, encoding="utf-8")
    out = tmp_path / "map.vprindex"
    status, _, err = vprhub_main(capsys, *_build(workspace, out, "--metadata", str(tmp_path / "meta.csv")))
    assert status == 0, err
    index = PlaceIndex.load(out)
    by_name = {Path(m["path"]).name: m for m in index.metadata(index.ids)}
    assert by_name[names[1]]["lat"] == 1.5 and by_name[names[1]]["lon"] == 1 and "lat" not in by_name[names[2]]


def test_index_inside_its_image_folder_is_not_indexed(workspace, tmp_path, capsys):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(workspace / "photos", photos)
    build = ["index", "build", "--model", str(workspace / "model"), "--images", str(photos),
             "--out", str(photos / "inside.vprindex"), "--num-workers", "0", "--quiet"]  # fmt: skip
    assert vprhub_main(capsys, *build)[0] == 0
    status, out, err = vprhub_main(capsys, *build, "--overwrite", "--store", str(photos / "kept"))
    assert status == 0 and "indexed 4 of 4 files" in out and "skipped" not in out, out + err


def test_tampered_descriptor_store_is_refused(workspace, tmp_path, capsys):
    store = tmp_path / "s2"
    build = _build(workspace, tmp_path / "map.vprindex", "--store", str(store), "--overwrite")
    assert vprhub_main(capsys, *build)[0] == 0
    shard = store / "shard-000000"
    tampered = [
        ("rows.npy", np.array([0, 0, 1, 2]), "shard 0 has rows.npy that is not strictly increasing"),
        ("rows.npy", np.array([0, 1, 2, 999]), "rows.npy and skipped.json do not cover its inputs 0..3 exactly once"),
        ("skipped.json", [{"x": 1}], 'skipped.json that is not a list of {"index", "input", "error"} entries'),
        ("rows.npy", np.array(3), "shard 0 has rows.npy of int64 [], expected 1-d integers"),
        ("descriptors.npy", np.full((4, 3), "abcde"), "shard 0 has descriptors.npy of <U5 [4, 3], expected [n, DIM] float32"),
        ("descriptors.npy", np.zeros((4, 3), np.float32), "shard 0 has descriptors.npy of float32 [4, 3], expected [n, DIM] float32"),
    ]
    originals = {name: (shard / name).read_bytes() for name in ("rows.npy", "descriptors.npy", "skipped.json")}
    width = np.load(shard / "descriptors.npy").shape[1]  # the model's descriptor width, as written
    # A few flipped bytes of data keep the file well-formed: the recorded SHA-256 catches them.
    flipped = bytearray(originals["descriptors.npy"])
    flipped[-8:-4] = b"\xff\xff\x7f\x7f"
    (shard / "descriptors.npy").write_bytes(bytes(flipped))
    status, _, err = vprhub_main(capsys, *build)
    assert status == 2 and f"damaged descriptor store {store}: shard 0 (descriptors.npy changed on disk" in err, err
    # Without checksums (a shard of an older vprhub, or checksums removed), the structure is checked.
    (shard / "checksums.json").unlink()
    for name, content, message in tampered:
        for original, data in originals.items():
            (shard / original).write_bytes(data)
        if name.endswith(".npy"):
            np.save(shard / name, content)
        else:
            (shard / name).write_text(json.dumps(content))
        status, _, err = vprhub_main(capsys, *build)
        message = message.replace("DIM", str(width))
        assert status == 2 and f"damaged descriptor store {store}: " in err and message in err, err


def test_failed_build_removes_its_own_store_only(workspace, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("not an image")
    build = ["index", "build", "--model", str(workspace / "model"), "--images", str(tmp_path / "junk"),
             "--num-workers", "0", "--quiet", "--out"]  # fmt: skip
    status, _, err = vprhub_main(capsys, *build, str(tmp_path / "map.vprindex"))
    assert status == 2 and "no readable image among the 1 inputs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]  # no hidden .map.vprindex.embeddings
    status, _, _ = vprhub_main(capsys, *build, str(tmp_path / "map.vprindex"), "--store", str(tmp_path / "kept"))
    assert status == 2 and (tmp_path / "kept" / "store.json").is_file()  # a store the user named is kept


def test_missing_index_and_file_as_image_folder_are_named(workspace, tmp_path, capsys):
    query = str(workspace / "photos" / Path(_photos(workspace)[0]).name)
    status, _, err = vprhub_main(capsys, "search", query, "--index", str(tmp_path / "nope.vprindex"))
    assert status == 2 and f"index {tmp_path / 'nope.vprindex'} does not exist" in err
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / "map.vprindex")[:5], query,
                                 "--out", str(tmp_path / "map.vprindex"))  # fmt: skip
    assert status == 2 and f"image folder {query} is a file, not a folder" in err


def test_search_clamps_top_k_and_names_missing_filter_metadata(workspace, tmp_path, capsys):
    out = tmp_path / "map.vprindex"
    assert vprhub_main(capsys, *_build(workspace, out))[0] == 0
    query = str(workspace / "photos" / Path(_photos(workspace)[0]).name)
    status, stdout, err = vprhub_main(capsys, "search", query, "--index", str(out), "--top-k", "100", "--json")
    assert status == 0, err
    hits = json.loads(stdout)[0]["hits"]
    assert len(hits) == 4 and hits[0]["metadata"]["path"] == query  # every entry, the query itself first
    status, _, err = vprhub_main(capsys, "search", query, "--index", str(out), "--near", "59.9,10.7", "--radius-m", "500")
    assert status == 2 and "no entry of the index has the metadata key ['lat', 'lon']" in err
    status, _, err = vprhub_main(capsys, "search", query, "--index", str(out), "--where", "city=Oslo")
    assert status == 2 and "no entry of the index has the metadata key ['city']" in err


# ---------------------------------------------------------------------- damaged or foreign model folders
def _model_copy(workspace: Path, tmp_path: Path) -> Path:
    """A copy of the workspace model (config, weights, image processor) to damage."""
    import shutil

    return Path(shutil.copytree(workspace / "model", tmp_path / "model"))


def _index_build(workspace: Path, tmp_path: Path, model: Path, *options: str) -> subprocess.CompletedProcess:
    return run_cli("index", "build", "--model", str(model), "--images", str(workspace / "photos"),
                   "--out", "map.vprindex", *options, cwd=tmp_path)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """rc 2 and ``message`` as the only line on stderr besides transformers' "Loading weights" progress bar."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading weights: ")]
    assert lines == [message], result.stderr


def test_weights_that_do_not_fit_the_model_are_refused(workspace, tmp_path):
    from safetensors.torch import save_file

    model = _model_copy(workspace, tmp_path)
    save_file({"unrelated": torch.zeros(1)}, model / "model.safetensors")
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, result.stderr.strip().splitlines()[-1])
    assert_user_error(result, f"vprhub index: error: --model {model}: the weights do not fit its 'salad' config: "
                      "missing [aggregator.cluster_features.0.bias, ", "... and 44 more] (56); unexpected [unrelated] (1)")  # fmt: skip
    assert not (tmp_path / "map.vprindex").exists()


def test_salad_weights_under_a_cricavpr_config_are_refused(workspace, tmp_path):
    import json

    model = _model_copy(workspace, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "cricavpr"}))
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, result.stderr.strip().splitlines()[-1])
    assert_user_error(result, f"vprhub index: error: --model {model}: the weights do not fit its 'cricavpr' config: "
                      "missing [backbone.encoder.layer.0.adapters.", "unexpected [aggregator.cluster_features.0.bias, ")  # fmt: skip


@pytest.mark.parametrize("container", ["plain pickle", "torch zip"])
def test_pickled_weights_are_refused_without_running(workspace, tmp_path, container):
    import pickle
    import zipfile

    marker = tmp_path / "pwned"
    model = _model_copy(workspace, tmp_path)
    (model / "model.safetensors").unlink()
    weights = model / "pytorch_model.bin"
    if container == "plain pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    else:  # a real torch.save file whose data.pkl is replaced by the payload
        torch.save({"x": torch.zeros(1)}, tmp_path / "real.bin")
        with zipfile.ZipFile(tmp_path / "real.bin") as real, zipfile.ZipFile(weights, "w") as hostile:
            for item in real.infolist():
                payload = item.filename.endswith("/data.pkl")
                hostile.writestr(item, pickle.dumps(_Payload(marker), protocol=2) if payload else real.read(item))
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, f"vprhub index: error: --model {model}: refusing pickled weights that import posix.system")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_safetensors_weights_are_one_line(workspace, tmp_path, damage):
    model = _model_copy(workspace, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(5000))
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, result.stderr.strip().splitlines()[-1])
    assert_user_error(result, f"vprhub index: error: --model {model}: weights file model.safetensors is damaged (")


def test_model_folder_without_weights_is_one_line(workspace, tmp_path):
    model = _model_copy(workspace, tmp_path)
    (model / "model.safetensors").unlink()
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, f"vprhub index: error: no weights (model.safetensors) in --model {model}")


def test_a_model_of_another_type_is_refused_before_loading(workspace, tmp_path):
    import json

    model = _model_copy(workspace, tmp_path)
    bert = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    (model / "config.json").write_text(json.dumps(bert))
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(
        result,
        f"vprhub index: error: --model {model} is a 'bert' model, not a vprhub model (salad, cricavpr, selavpr, megaloc)",
    )


def test_custom_code_in_the_model_folder_is_never_run_or_prompted_for(workspace, tmp_path):
    import json

    marker = tmp_path / "ran"
    model = _model_copy(workspace, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="zzz", auto_map={"AutoConfig": "evil.Config", "AutoModel": "evil.Model"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "vprhub.cli", "index", "build", "--model", str(model), "--images",
         str(workspace / "photos"), "--out", "map.vprindex"],
        cwd=tmp_path, env=env, input="y\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_one_line_error(
        result,
        f"vprhub index: error: --model {model} is a 'zzz' model, not a vprhub model (salad, cricavpr, selavpr, megaloc)",
    )
    assert "[y/N]" not in result.stdout + result.stderr and not marker.exists()


def test_convert_an_image_is_not_a_checkpoint(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "some.jpg")
    result = run_cli("convert", "salad", "some.jpg", "out", cwd=tmp_path)
    assert_one_line_error(
        result,
        "vprhub convert: error: some.jpg is not a checkpoint vprhub can read safely "
        "(expected a PyTorch checkpoint of tensors or a .safetensors file)",
    )
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_pickled_payload_without_running(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    (tmp_path / "salad.ckpt").write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    result = run_cli("convert", "salad", "salad.ckpt", "out", cwd=tmp_path)
    assert_one_line_error(result, "vprhub convert: error: salad.ckpt: refusing pickled weights that import posix.system")
    assert not marker.exists()


@pytest.mark.parametrize(
    "command",
    [
        ("index", "build", "--model", "model", "--images", "photos", "--out", "{tmp}/map.vprindex"),
        ("search", "photos", "--index", "{tmp}/map.vprindex"),
        ("eval", "--model", "model", "--dataset", "photos"),
        ("serve", "--index", "{tmp}/map.vprindex"),
    ],
    ids=lambda command: command[0],
)
def test_unknown_device_is_refused_before_anything_loads(workspace, tmp_path, command):
    args = [part.format(tmp=tmp_path) for part in command]
    result = run_cli(*args, "--device", "gpu", cwd=workspace)
    assert_one_line_error(result, f"vprhub {command[0]}: error: unknown device 'gpu'; use cpu, cuda, cuda:N, mps or xpu")


def _damaged_json_model(workspace: Path, tmp_path: Path, name: str, content) -> Path:
    model = _model_copy(workspace, tmp_path)
    if callable(content):
        content = content(json.loads((model / name).read_text()))
    (model / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return model


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.json", "[1,2]", "--model {model}: config.json is not a JSON object (got list)"),
        ("config.json", lambda c: {**c, "model_type": ["salad"]}, "--model {model} is a ['salad'] model, not a vprhub"),
        ("config.json", lambda c: {**c, "backbone_config": "abc"}, "--model {model}: config.json is not a valid 'salad' config ("),
        ("preprocessor_config.json", "[1]", "cannot read the image processor {model}/preprocessor_config.json: "),
        ("preprocessor_config.json", {"size": "abc"}, "cannot read the image processor {model}/preprocessor_config.json: "),
    ],
    ids=["config list", "model_type list", "backbone_config string", "processor list", "processor unknown"],
)
def test_malformed_model_json_is_one_short_line(workspace, tmp_path, capsys, name, content, message):
    model = _damaged_json_model(workspace, tmp_path, name, content)
    build = ["index", "build", "--model", str(model), "--images", str(workspace / "photos"),
             "--out", str(tmp_path / "map.vprindex"), "--num-workers", "0", "--quiet"]  # fmt: skip
    status, _, err = vprhub_main(capsys, *build)
    assert status == 2 and message.format(model=model) in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 400, err
    assert not (tmp_path / "map.vprindex").exists()


def test_a_file_as_model_is_named_as_not_a_folder(workspace, tmp_path, capsys):
    config = workspace / "model" / "config.json"
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / "map.vprindex")[:2], "--model", str(config),
                                 *_build(workspace, tmp_path / "map.vprindex")[4:])  # fmt: skip
    assert status == 2 and f"--model {config} is a file, not a model folder or a Hub id" in err, err
    # the folder above a model (the demo's root, say) is no model either
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / "map.vprindex")[:2], "--model", str(workspace),
                                 *_build(workspace, tmp_path / "map.vprindex")[4:])  # fmt: skip
    assert status == 2 and f"--model {workspace} has no config.json: not a model folder" in err, err


@pytest.fixture(scope="module")
def sharded_model(workspace, tmp_path_factory) -> Path:
    """The workspace model saved in 4 safetensors shards with their index."""
    folder = tmp_path_factory.mktemp("sharded") / "model"
    from vprhub.loading import load_model

    load_model(workspace / "model").save_pretrained(folder, max_shard_size="200KB")
    vprhub.vpr_image_processor(*MODEL_INPUT).save_pretrained(folder)
    return folder


def _redirect_last_shard(index: dict, target: str) -> str:
    """``index`` with its last shard's tensors mapped to ``target``; the shard's name."""
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {key: target if shard == last else shard for key, shard in index["weight_map"].items()}
    return last


@pytest.mark.parametrize("damage", ["list", "invalid JSON", "no metadata", "parent folder", "absolute path", "missing shard"])
def test_shard_index_is_checked_and_never_leaves_the_folder(sharded_model, workspace, tmp_path, capsys, damage):
    import shutil

    model = Path(shutil.copytree(sharded_model, tmp_path / "model"))
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    build = ["index", "build", "--model", str(model), "--images", str(workspace / "photos"),
             "--out", str(tmp_path / "map.vprindex"), "--num-workers", "0", "--quiet"]  # fmt: skip
    assert vprhub_main(capsys, *build)[0] == 0  # the intact shards load
    if damage == "list":
        index_path.write_text("[1, 2]")
        message = "model.safetensors.index.json is not a JSON object (got list)"
    elif damage == "invalid JSON":
        index_path.write_text("{bad")
        message = "model.safetensors.index.json is not valid JSON ("
    elif damage == "no metadata":
        index_path.write_text(json.dumps({"weight_map": index["weight_map"]}))
        message = "model.safetensors.index.json has no metadata object"
    elif damage == "missing shard":
        (model / _redirect_last_shard(index, "gone.safetensors")).unlink()
        index_path.write_text(json.dumps(index))
        message = "model.safetensors.index.json names the weights file gone.safetensors, which is missing"
    else:
        outside = tmp_path / "outside.safetensors"
        target = "../outside.safetensors" if damage == "parent folder" else str(outside)
        shutil.move(model / _redirect_last_shard(index, target), outside)
        index_path.write_text(json.dumps(index))
        message = f"model.safetensors.index.json names {target!r}, not a file name inside the model folder"
    status, _, err = vprhub_main(capsys, *build, "--overwrite")
    assert status == 2 and f"--model {model}: {message}" in err, err


def test_pickled_shards_are_scanned_and_refused_quietly(sharded_model, workspace, tmp_path):
    import pickle
    import shutil

    from safetensors.torch import load_file

    marker = tmp_path / "pwned"
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(sharded_model / "config.json", model)
    shutil.copy(sharded_model / "preprocessor_config.json", model)
    weight_map = {}
    for number, shard in enumerate(sorted(sharded_model.glob("model-*.safetensors"))):
        name = f"pytorch_model-{number}.bin"
        tensors = load_file(shard)
        torch.save(tensors, model / name)
        weight_map |= dict.fromkeys(tensors, name)
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / "pytorch_model-1.bin").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(result, f"vprhub index: error: --model {model}: refusing pickled weights that import posix.system")
    (model / "pytorch_model-1.bin").write_bytes(pickle.dumps({"a": {1, 2}}, protocol=4))  # no import, still refused
    result = _index_build(workspace, tmp_path, model)
    assert_one_line_error(
        result, f"vprhub index: error: --model {model}: refusing pickled weights that torch's weights-only loader rejects"
    )  # and no warning about the pickle protocol
    assert not marker.exists()


# ---------------------------------------------------------------------- full disk, read-only places, long names
@pytest.mark.parametrize(
    "failure, reason",
    [
        (OSError(28, "No space left on device"), "no space left on device"),  # errno.ENOSPC, as file.write raises it
        (OSError("81920 requested and 71648 written"), "only 71648 of 81920 bytes written (no space left on device?)"),
    ],
)
def test_a_full_disk_while_embedding_is_one_line_and_leaves_nothing(workspace, tmp_path, capsys, monkeypatch, failure, reason):
    from numpy.lib import format as npy_format

    def full_disk(*args, **kwargs):
        raise failure  # numpy's lowest-level write of a descriptor shard

    monkeypatch.setattr(npy_format, "write_array", full_disk)
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / "map.vprindex"))
    shard = tmp_path / ".map.vprindex.embeddings" / "shard-000000"  # the shard, not its temporary
    assert status == 2 and err.splitlines() == [f"vprhub index: error: cannot write {shard}: {reason}"]
    assert list(tmp_path.iterdir()) == []  # no temporary, no half-written store or index


def test_a_full_disk_while_faiss_writes_the_index_is_one_line(workspace, tmp_path, capsys, monkeypatch):
    import faiss

    def full_disk(index, path):
        raise RuntimeError(
            "Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: Error: "
            f"'ret == (size * 4)' failed: write error in {path}: 65491 != 512000 (No space left on device)"
        )  # what faiss raises on a full disk

    old = tmp_path / "map.vprindex"
    assert vprhub_main(capsys, *_build(workspace, old))[0] == 0
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(faiss, "write_index", full_disk)
    status, _, err = vprhub_main(capsys, *_build(workspace, old, "--overwrite"))
    assert status == 2 and err.splitlines() == [f"vprhub index: error: cannot write {old / 'index.faiss'}: no space left on device"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # the old index is intact


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch) -> Path:
    """``tmp_path/ro``, seen as a folder of a read-only file system (mounting needs root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    access, statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != folder and access(path, mode, **kw))
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly() if Path(path) == folder else statvfs(path))
    return folder


def test_read_only_outputs_are_refused_before_any_work(workspace, tmp_path, capsys, read_only_folder):
    query = str(workspace / "photos" / _photos(workspace)[0])
    missing = str(tmp_path / "missing")  # a model or index that does not exist: refused later, if at all
    commands = {
        "export": ["export", "onnx", missing, "x.onnx"],
        "index": ["index", "build", "--model", missing, "--images", str(workspace / "photos"), "--out", "x.vprindex"],
        "index ": ["index", "export", "--index", missing, "--hloc", "x.h5"],
        "search": ["search", query, "--index", missing, "--plot", "x.png"],
        "search ": ["search", query, "--index", missing, "--pairs", "sub/x.txt"],
    }
    for command, argv in commands.items():
        out = read_only_folder / argv[-1]
        status, _, err = vprhub_main(capsys, *argv[:-1], str(out))
        expected = f"vprhub {command.strip()}: error: cannot write {out}: read-only file system ({read_only_folder} is not writable)"
        assert status == 2 and err.splitlines() == [expected]
    assert list(read_only_folder.iterdir()) == []


def test_long_output_names_get_legal_temporaries_and_too_long_ones_one_line(workspace, tmp_path, capsys):
    longest = "c" * 246 + ".vprindex"  # 255 bytes: legal, but ".NAME.embeddings" or ".NAME.<pid>.<random>.tmp" are not
    status, out, err = vprhub_main(capsys, *_build(workspace, tmp_path / longest))
    assert status == 0 and f"-> {tmp_path / longest}" in out, err
    assert [p.name for p in tmp_path.iterdir()] == [longest]  # no store or temporary left
    status, _, err = vprhub_main(capsys, *_build(workspace, tmp_path / ("d" + longest)))
    assert status == 2 and err.splitlines() == [
        f"vprhub index: error: cannot write {tmp_path / ('d' + longest)}: its name has 256 bytes, at most 255 are allowed"
    ]
