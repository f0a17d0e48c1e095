"""Hostile and damaged input through the API: data files never run code, ``--overwrite``
replaces only what vprhub wrote, killed saves are cleaned up and recovered."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from vprhub.evaluation.npy_lists import load_npy, read_npy_lists


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
