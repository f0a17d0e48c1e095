"""Hostile and damaged input through the API: data files never run code, ``--overwrite``
replaces only what vprhub wrote, killed saves are cleaned up and recovered."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct
from numpy.lib import format as npy_format

from vprhub.errors import RefusedOverwriteError
from vprhub.evaluation.npy_lists import load_npy, read_npy_lists
from vprhub.pipelines import PlaceIndex
from vprhub.utils import (
    MODEL_FOLDER,
    FolderKind,
    atomic_write_dir,
    check_replaceable,
    check_replaceable_file,
    recover_dir,
)


class _Payload:
    """Unpickling this runs ``os.system`` (what a hostile ``*_gt.npy`` would carry)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save_object_array(path: Path, items: list) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    np.save(path, array, allow_pickle=True)


def test_npy_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile_gt.npy"
    _save_object_array(hostile, [np.array([0, 1]), _Payload(marker)])
    with pytest.raises(ValueError, match=r"hostile_gt.npy .*refusing its pickled content: it asks for posix.system"):
        load_npy(hostile)
    assert not marker.exists()


def test_npy_payload_in_image_list_stops_read_npy_lists(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "x_dbImages.npy", np.array(["a.jpg"]))
    _save_object_array(tmp_path / "x_qImages.npy", ["b.jpg", _Payload(marker)])
    with pytest.raises(ValueError, match="x_qImages.npy .*refusing"):
        read_npy_lists(tmp_path, "x")
    assert not marker.exists()


def test_npy_object_of_other_type_is_refused(tmp_path):
    path = tmp_path / "dict_gt.npy"
    _save_object_array(path, [{"a": 1}, np.array([1])])
    with pytest.raises(ValueError, match="holds a dict, not numbers or strings"):
        load_npy(path)


def test_npy_ragged_index_arrays_and_strings_round_trip(tmp_path):
    ragged = [np.array([3, 1, 4], dtype=np.int64), np.array([], dtype=np.int64), np.array([5], dtype=np.int32)]
    _save_object_array(tmp_path / "gt.npy", ragged)
    loaded = load_npy(tmp_path / "gt.npy")
    assert loaded.dtype == object and len(loaded) == 3
    for got, want in zip(loaded, ragged):
        assert got.dtype == want.dtype
        assert got.tolist() == want.tolist()
    _save_object_array(tmp_path / "names.npy", ["ref/0001.jpg", "ref/ü.jpg"])
    assert load_npy(tmp_path / "names.npy").tolist() == ["ref/0001.jpg", "ref/ü.jpg"]
    np.save(tmp_path / "plain.npy", np.array(["q/1.jpg", "q/2.jpg"]))
    assert load_npy(tmp_path / "plain.npy").tolist() == ["q/1.jpg", "q/2.jpg"]


def test_npy_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut_gt.npy"
    _save_object_array(path, [np.arange(50), np.arange(7)])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="cut_gt.npy is not a readable .npy file"):
        load_npy(path)


class _Reduce:
    """Pickles as the given ``__reduce__`` tuple: the calls a crafted ``*_gt.npy`` makes."""

    def __init__(self, *reduction) -> None:
        self.reduction = reduction

    def __reduce__(self):
        return self.reduction


@pytest.mark.parametrize(
    "item, message",
    [
        (_Reduce(np.ndarray, ((10**11,), "f8")), "calls numpy.ndarray directly"),
        (_Reduce(_reconstruct, (np.ndarray, (10**11,), b"b")), r"announces a \[100000000000\] int8 array"),
        (  # an object array that claims a million items and carries one: numpy would read past it and crash
            _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**6,), np.dtype("O"), False, [None])),
            "an object array of 1000000 items does not carry them",
        ),
    ],
)
def test_npy_pickle_of_a_huge_or_inconsistent_array_is_refused(tmp_path, item, message):
    path = tmp_path / "huge_gt.npy"
    _save_object_array(path, [np.array([0]), item])
    with pytest.raises(ValueError, match=f"huge_gt.npy is not a readable .npy file.*{message}"):
        load_npy(path)


def test_npy_header_larger_than_the_file_is_refused(tmp_path):
    path = tmp_path / "big_gt.npy"
    with open(path, "wb") as handle:
        npy_format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": (10**11,)})
        handle.write(bytes(16))
    with pytest.raises(ValueError, match=r"big_gt.npy .*\[100000000000\] float64 array .* holds only 16 bytes"):
        load_npy(path)



def _nested_object_array(depth: int) -> np.ndarray:
    """``[1, 2]`` inside ``depth`` one-item object arrays."""
    value = np.array([1, 2])
    for _ in range(depth):
        outer = np.empty(1, dtype=object)
        outer[0] = value
        value = outer
    return value


def test_npy_nesting_is_bounded_not_a_recursion_error(tmp_path):
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # numpy pickles the 3000 levels recursively
    try:
        np.save(tmp_path / "deep_gt.npy", _nested_object_array(3000), allow_pickle=True)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ValueError, match=r"deep_gt.npy holds object arrays nested more than 16 deep, not numbers"):
        load_npy(tmp_path / "deep_gt.npy")
    np.save(tmp_path / "ok_gt.npy", _nested_object_array(15), allow_pickle=True)
    loaded = load_npy(tmp_path / "ok_gt.npy")
    for _ in range(15):
        assert type(loaded) is np.ndarray and loaded.shape == (1,)
        loaded = loaded[0]
    assert loaded.tolist() == [1, 2]

# ---------------------------------------------------------------------- --overwrite
SRC = Path(__file__).resolve().parents[1] / "src"


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "holiday.jpg").write_bytes(b"not vprhub's")
    return path


def _small_index() -> PlaceIndex:
    index = PlaceIndex(4)
    index.add(np.eye(4, dtype=np.float32), [{"n": i} for i in range(4)])
    return index


def test_overwrite_refuses_a_folder_vprhub_did_not_write(tmp_path):
    photos = _user_folder(tmp_path / "photos")
    with pytest.raises(FileExistsError, match=r"refusing to replace .*photos: it is not a vprhub place index"):
        _small_index().save(photos, overwrite=True)
    assert (photos / "holiday.jpg").read_bytes() == b"not vprhub's"
    with pytest.raises(FileExistsError, match="not a vprhub model folder"):
        check_replaceable(photos, overwrite=True, kind=MODEL_FOLDER)


def test_overwrite_refuses_an_output_lookalike_holding_other_files(tmp_path):
    fake = _user_folder(tmp_path / "fake")
    (fake / "vprindex.json").write_text('{"format": "vprhub-place-index"}')  # the format alone is no index
    with pytest.raises(FileExistsError, match=r"not a vprhub place index \(vprindex.json\) holding only files vprhub wrote"):
        _small_index().save(fake, overwrite=True)
    real = tmp_path / "map.vprindex"
    _small_index().save(real)
    (real / "notes.txt").write_text("precious")  # a real index the user put a file into
    with pytest.raises(FileExistsError, match="not a vprhub place index"):
        _small_index().save(real, overwrite=True)
    assert (real / "notes.txt").read_text() == "precious" and (fake / "holiday.jpg").is_file()

    import vprhub

    model = tmp_path / "model"
    vprhub.build_model("salad", image_size=[56, 56]).save_pretrained(model)
    check_replaceable(model, overwrite=True, kind=MODEL_FOLDER)  # save_pretrained's files only
    (model / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a vprhub model folder"):
        check_replaceable(model, overwrite=True, kind=MODEL_FOLDER)


def test_generated_folders_with_other_files_are_not_replaced(tmp_path):
    from vprhub.data.synthetic import write_gmberton_benchmark
    from vprhub.demo import _fresh_folder

    city = write_gmberton_benchmark(tmp_path / "city", num_places=2, image_size=32)
    write_gmberton_benchmark(city, num_places=2, image_size=32, overwrite=True)
    (city / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a vprhub synthetic dataset"):
        write_gmberton_benchmark(city, num_places=2, image_size=32, overwrite=True)
    demo = _fresh_folder(tmp_path / "demo", overwrite=False)
    (demo / "matches_p000000.png").write_bytes(b"png")
    _fresh_folder(demo, overwrite=True)
    (demo / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a vprhub demo folder"):
        _fresh_folder(demo, overwrite=True)
    assert (city / "notes.txt").is_file() and (demo / "notes.txt").is_file()


def test_overwrite_never_replaces_the_folder_holding_the_inputs(tmp_path):
    out = tmp_path / "out"
    _small_index().save(out)
    (out / "query.jpg").write_bytes(b"input")  # an index folder that now also holds an input
    with pytest.raises(FileExistsError, match="it holds the input"):
        check_replaceable(out, overwrite=True, kind=MODEL_FOLDER, inputs=[out / "query.jpg"])
    with pytest.raises(FileExistsError, match="it holds the input"):
        check_replaceable(tmp_path, overwrite=True, inputs=[out])


def test_overwrite_replaces_an_earlier_output_of_the_same_kind(tmp_path):
    out = tmp_path / "map.vprindex"
    _small_index().save(out)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        _small_index().save(out)
    bigger = _small_index()
    bigger.add(np.ones((1, 4), np.float32), [{"n": 4}])
    bigger.save(out, overwrite=True)
    assert len(PlaceIndex.load(out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.vprindex"]


def test_output_files_replace_only_what_vprhub_wrote(tmp_path):
    from vprhub.export.hloc import PAIRS_FILE, write_pairs

    pairs = tmp_path / "pairs.txt"
    check_replaceable_file(pairs, False, PAIRS_FILE)  # a new file is fine
    write_pairs(pairs, [("q/1.jpg", "db/2.jpg")])
    check_replaceable_file(pairs, True, PAIRS_FILE)
    write_pairs(pairs, [])
    check_replaceable_file(pairs, True, PAIRS_FILE)  # no pairs: an empty file
    notes = tmp_path / "notes.txt"
    notes.write_text("buy milk\n")
    with pytest.raises(FileExistsError, match="notes.txt: it is not a vprhub pairs file"):
        check_replaceable_file(notes, True, PAIRS_FILE)
    with pytest.raises(FileExistsError, match=f"cannot write .*: {notes} is a file, not a folder"):
        check_replaceable_file(notes / "pairs.txt", True, PAIRS_FILE)
    with pytest.raises(FileExistsError, match="pairs.txt: it is one of the inputs"):
        check_replaceable_file(pairs, True, PAIRS_FILE, inputs=[tmp_path / "." / "pairs.txt"])


def test_demo_overwrite_replaces_its_own_folder_only(tmp_path):
    from vprhub.demo import _fresh_folder

    out = _fresh_folder(tmp_path / "demo", overwrite=False)
    (out / "city").mkdir()
    assert sorted(p.name for p in _fresh_folder(out, overwrite=True).iterdir()) == ["vprhub-demo.txt"]
    photos = _user_folder(tmp_path / "photos")
    with pytest.raises(FileExistsError, match="not a vprhub demo folder"):
        _fresh_folder(photos, overwrite=True)
    assert (photos / "holiday.jpg").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--places", "0"], "--places must be at least 2"),
        (["--places", "1"], "--places must be at least 2"),  # top 3 of 2 database images
        (["--steps", "-5"], "--steps must be 0 or positive, got -5"),
        (["--queries", "0"], "--queries must be between 1 and --places (40), got 0"),
        (["--places", "3", "--queries", "4"], "--queries must be between 1 and --places (3), got 4"),
    ],
)
def test_demo_checks_its_arguments_before_any_work(tmp_path, capsys, flags, message):
    from vprhub.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 2
    assert f"vprhub demo: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing made, so a rerun needs no --overwrite


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_demo_leaves_its_folder_as_it_was(tmp_path, monkeypatch, existed):
    import argparse

    import vprhub.demo

    def fail(args, out):
        (out / "city").mkdir()
        raise RuntimeError("stopped half-way")

    out = tmp_path / "d"
    if existed:
        out.mkdir()
    monkeypatch.setattr(vprhub.demo, "_run_demo", fail)
    args = argparse.Namespace(out=str(out), places=40, steps=60, queries=3, overwrite=False)
    with pytest.raises(RuntimeError, match="half-way"):
        vprhub.demo.run(args)
    assert out.exists() == existed and (not existed or not any(out.iterdir()))


def test_training_start_removes_only_earlier_checkpoints(tmp_path):
    from types import SimpleNamespace

    from vprhub.training import TrainArguments
    from vprhub.training.loop import _prepare_output_dir

    checkpoints = tmp_path / "run" / "checkpoints"
    _user_folder(checkpoints / "notes")
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-3" / "trainer_state.json").write_text("{}")
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    args = TrainArguments(output_dir=str(tmp_path / "run"), overwrite_output_dir=True, report_to="none")
    _prepare_output_dir(args, accelerator)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes"]
    assert (checkpoints / "notes" / "holiday.jpg").read_bytes() == b"not vprhub's"


# ---------------------------------------------------------------------- killed saves
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_dead_processes_are_cleaned_on_the_next_write(tmp_path):
    out = tmp_path / "map.vprindex"
    pid = _dead_pid()
    stale = [tmp_path / f".map.vprindex.{pid}.k2j4_x9.tmp", tmp_path / f".map.vprindex.trash-{pid}"]
    live = tmp_path / f".map.vprindex.{os.getppid()}.abc.tmp"  # a running process: left alone
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "index.faiss").write_bytes(b"\0" * 1000)
    _small_index().save(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["map.vprindex", live.name])


def test_a_long_legal_name_gets_short_temporaries_that_are_cleaned_like_others(tmp_path):
    import hashlib

    name = "m" * 246 + ".vprindex"  # 255 bytes: the longest legal name
    stem = "vprhub-" + hashlib.sha256(name.encode()).hexdigest()[:16]  # what its temporaries are named after
    pid = _dead_pid()
    stale = tmp_path / f".{stem}.{pid}.k2j4_x9.tmp"
    live = tmp_path / f".{stem}.{os.getppid()}.abc.tmp"  # a running process: left alone
    for folder in (stale, live):
        folder.mkdir()
    _small_index().save(tmp_path / name)
    _small_index().save(tmp_path / name, overwrite=True)  # through .old and .trash siblings
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, live.name])
    assert len(PlaceIndex.load(tmp_path / name)) == 4


def test_a_crash_between_the_two_renames_is_recovered_on_load(tmp_path):
    out = tmp_path / "map.vprindex"
    _small_index().save(out)
    old = tmp_path / f".map.vprindex.old-{_dead_pid()}"
    os.replace(out, old)  # the state between ``path -> .old`` and ``tmp -> path``
    loaded = PlaceIndex.load(out)
    assert len(loaded) == 4 and loaded.metadata([2]) == [{"n": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.vprindex"]


# A package stub makes ``vprhub.utils`` importable without ``vprhub/__init__`` (torch, transformers):
# the child starts in a fraction of a second.
KILLED_SAVE = """
import os, signal, sys, types
package = types.ModuleType("vprhub")
package.__path__ = [sys.argv[2]]
sys.modules["vprhub"] = package
from vprhub import utils
real_replace, renames = os.replace, []
def replace(src, dst):
    real_replace(src, dst)
    renames.append(dst)
    if len(renames) == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
kind = utils.FolderKind("a test folder", lambda p: (p / "version").is_file())
with utils.atomic_write_dir(sys.argv[1], overwrite=True, kind=kind) as tmp:
    (tmp / "version").write_text("new")
"""


@pytest.mark.parametrize("killed_after_renames", [0, 1, 2])
def test_kill_9_during_a_save_leaves_the_old_or_the_new_content(tmp_path, killed_after_renames):
    target = tmp_path / "model"
    kind = FolderKind("a test folder", lambda p: (p / "version").is_file())
    with atomic_write_dir(target, kind=kind) as tmp:
        (tmp / "version").write_text("old")
    script = KILLED_SAVE.replace("KILL_AFTER", str(killed_after_renames or 99))
    if not killed_after_renames:  # killed while writing: before any rename
        script = script.replace("write_text(\"new\")", "write_text(\"new\"); os.kill(os.getpid(), signal.SIGKILL)")
    result = subprocess.run([sys.executable, "-c", script, str(target), str(SRC / "vprhub")])
    assert result.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".model.") for p in tmp_path.iterdir())  # what kill -9 left
    recover_dir(target)
    expected = "new" if killed_after_renames == 2 else "old"
    assert (target / "version").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------------- folder or Hub id
def test_local_looking_sources_are_never_hub_ids(tmp_path, monkeypatch):
    from vprhub.utils import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "salad").mkdir(parents=True)
    assert resolve_source("runs/salad") == str(tmp_path / "runs" / "salad")
    for missing in ("./model", "../model", "~/no-such-model-folder", "/no/such/model", "runs/selavpr", "a/b/c", "x\\y"):
        with pytest.raises(FileNotFoundError, match=f"--model {re.escape(missing)} not found: no such file or folder"):
            resolve_source(missing, "--model")
    (tmp_path / "runs" / f".model.old-{_dead_pid()}").mkdir()  # a save killed between its renames
    assert resolve_source("runs/model") == str(tmp_path / "runs" / "model")
    assert resolve_source("facebook/dinov2-small") == "facebook/dinov2-small"
    assert resolve_source("gpt2") == "gpt2"


# ---------------------------------------------------------------------- the command's error guard
@pytest.mark.parametrize(
    ("error", "caught"),
    [(ValueError("bad\n  value"), True), (FileNotFoundError("no file"), True), (RuntimeError("a bug"), False)],
)
def test_cli_reports_user_errors_in_one_line_and_lets_bugs_through(monkeypatch, capsys, error, caught):
    import argparse

    import vprhub.cli

    def command(args):
        raise error

    parser = argparse.ArgumentParser(prog="vprhub")
    parser.set_defaults(func=command, command="probe")
    monkeypatch.setattr(vprhub.cli, "build_parser", lambda command=None: parser)
    if not caught:
        with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
            vprhub.cli.main([])
        return
    assert vprhub.cli.main([]) == 2
    assert capsys.readouterr().err == f"vprhub probe: error: {' '.join(str(error).split())}\n"


@pytest.mark.parametrize(
    "built_for, count, device, message",
    [
        (None, 0, "cuda", "CUDA is not available in this torch build (CPU only)"),
        ("cuda", 0, "cuda:0", "CUDA is not available: torch sees no CUDA device"),
        ("cuda", 2, "cuda:2", "device 'cuda:2' does not exist: torch sees 2 CUDA device(s), cuda:0 to cuda:1"),
        ("cuda", 2, "mps", "MPS is not available in this torch build (cuda only)"),
        ("cuda", 2, "gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N, mps or xpu"),
        ("cuda", 2, "meta", "unknown device 'meta'; use cpu, cuda, cuda:N, mps or xpu"),
    ],
)
def test_devices_are_checked_against_this_torch(monkeypatch, built_for, count, device, message):
    import torch

    from vprhub.loading import check_device

    accelerator = torch.device(built_for) if built_for else None
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: accelerator)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)
    with pytest.raises(ValueError) as error:
        check_device(device)
    assert str(error.value) == message


def test_existing_devices_pass_the_device_check(monkeypatch):
    import torch

    from vprhub.loading import check_device

    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    assert [check_device(d) for d in (None, "cpu", "cuda", "cuda:1")] == [None, "cpu", "cuda", "cuda:1"]


def test_a_symbolic_link_as_output_folder_is_refused_and_kept(tmp_path):
    """Replacing would swap the link itself (and rmtree cannot remove a link): refused up front."""
    from vprhub.demo import _fresh_folder

    target = tmp_path / "real"
    target.mkdir()
    (target / "vprhub-demo.txt").write_text("an earlier demo")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(RefusedOverwriteError, match=f"{link} is a symbolic link \\(to {target}\\)"):
        check_replaceable(link, overwrite=True)
    with pytest.raises(RefusedOverwriteError, match="is a symbolic link"):
        _fresh_folder(link, overwrite=True)
    assert link.is_symlink() and (target / "vprhub-demo.txt").read_text() == "an earlier demo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
