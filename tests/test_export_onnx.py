"""ONNX export: the graph run by onnxruntime on CPU gives PyTorch's descriptors, for every model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import vprhub
from vprhub.cli import main
from vprhub.export.onnx import export_onnx
from vprhub.factory import build_model

HEIGHT, WIDTH = 56, 70  # a non-square 4x5 patch grid


def tiny(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_type, initializer_range=0.1, **overrides).eval()


def run_onnx(path, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": pixel_values.numpy()})))


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def test_salad_dynamic_batch_matches_pytorch(tmp_path):
    model = tiny("salad")
    result = export_onnx(model, tmp_path / "salad.onnx", HEIGHT, WIDTH, dynamic_batch=True)
    assert result.output_names == ("descriptors",)
    x = images(3)  # traced at 2, run at 3
    outputs = run_onnx(result.path, x)
    with torch.no_grad():
        expected = model(pixel_values=x).descriptors.numpy()
    assert list(outputs) == ["descriptors"] and outputs["descriptors"].shape == expected.shape
    np.testing.assert_allclose(outputs["descriptors"], expected, atol=1e-4, rtol=0)
    assert result.max_abs_diff["descriptors"] < 1e-4
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props["vprhub.model_type"] == "salad" and json.loads(props["vprhub.image_size"]) == [HEIGHT, WIDTH]


def test_selavpr_exports_local_features_as_second_output(tmp_path):
    model = tiny("selavpr")
    path = export_onnx(model, tmp_path / "selavpr.onnx", HEIGHT, WIDTH, batch_size=2).path
    x = images(2)
    outputs = run_onnx(path, x)
    with torch.no_grad():
        expected = model(pixel_values=x)
    assert list(outputs) == ["descriptors", "local_features"]
    np.testing.assert_allclose(outputs["descriptors"], expected.descriptors.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs["local_features"], expected.local_features.numpy(), atol=1e-4, rtol=0)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, HEIGHT, WIDTH]  # a fixed batch without --dynamic-batch


def test_cricavpr_exports_its_independent_mode_by_default(tmp_path):
    model = tiny("cricavpr")
    assert model.config.batch_mode == "batch"
    result = export_onnx(model, tmp_path / "crica.onnx", HEIGHT, WIDTH, dynamic_batch=True)
    assert model.config.batch_mode == "batch"  # the caller's model is left as it was
    x = images(3)
    outputs = run_onnx(result.path, x)
    with torch.no_grad():
        independent = model(pixel_values=x, batch_mode="independent").descriptors.numpy()
        batched = model(pixel_values=x, batch_mode="batch").descriptors.numpy()
    np.testing.assert_allclose(outputs["descriptors"], independent, atol=1e-4, rtol=0)
    assert np.abs(independent - batched).max() > 1e-2  # the two modes really differ on this batch
    single = run_onnx(result.path, x[1:2])["descriptors"]  # batch-free: one image alone gives the same
    np.testing.assert_allclose(single[0], outputs["descriptors"][1], atol=1e-4, rtol=0)
    assert result.metadata["vprhub.batch_mode"] == "independent"


def test_cricavpr_batch_mode_graph_mixes_the_batch(tmp_path):
    model = tiny("cricavpr")
    result = export_onnx(model, tmp_path / "crica.onnx", HEIGHT, WIDTH, dynamic_batch=True, batch_mode="batch")
    x = images(3)
    with torch.no_grad():
        expected = model(pixel_values=x, batch_mode="batch").descriptors.numpy()
    np.testing.assert_allclose(run_onnx(result.path, x)["descriptors"], expected, atol=1e-4, rtol=0)
    assert "depends on all images of the call" in result.metadata["vprhub.batch_meaning"]
    assert "depends on all images" in onnx.load(str(result.path)).doc_string
    with pytest.raises(ValueError, match="batch of one image is the independent mode"):
        export_onnx(model, tmp_path / "one.onnx", HEIGHT, WIDTH, batch_mode="batch")
    with pytest.raises(ValueError, match="batch-dependent models"):
        export_onnx(tiny("salad"), tmp_path / "salad.onnx", HEIGHT, WIDTH, batch_mode="batch")


def test_cli_float16_export_and_overwrite_rules(tmp_path, capsys):
    model = tiny("salad")
    folder = tmp_path / "salad"
    model.save_pretrained(folder)
    vprhub.vpr_image_processor(HEIGHT, WIDTH).save_pretrained(folder)  # the default size comes from here
    out = tmp_path / "salad16.onnx"
    assert main(["export", "onnx", str(folder), str(out), "--dtype", "float16"]) == 0
    assert "onnxruntime (CPU) vs PyTorch" in capsys.readouterr().out
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    weights = [t for t in proto.graph.initializer if np.prod(t.dims) >= 64]  # not the float32 scalar constants
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["vprhub.image_size"]) == [HEIGHT, WIDTH] and props["vprhub.dtype"] == "float16"
    assert json.loads(props["vprhub.image_mean"]) == pytest.approx([0.485, 0.456, 0.406])
    x = images(1)
    half = run_onnx(out, x.half())["descriptors"]
    with torch.no_grad():
        full = model(pixel_values=x).descriptors.numpy()
    assert half.dtype == np.float32
    # Not a parity tolerance: float16 weights and activations (11-bit mantissa) against float32.
    assert float((half * full).sum()) > 0.9999

    assert main(["export", "onnx", str(folder), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"someone else's file")
    assert main(["export", "onnx", str(folder), str(foreign), "--overwrite"]) == 2
    assert "refusing to replace" in capsys.readouterr().err and foreign.read_bytes() == b"someone else's file"
    # The output is checked before the model is even looked for.
    assert main(["export", "onnx", str(tmp_path / "no-such-model"), str(foreign)]) == 2
    assert f"{foreign} exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "onnx", str(folder), str(tmp_path / "x.onnx"), "--dynamic-batch", "--batch-size", "4"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["export", "onnx", str(folder), str(tmp_path / "bad.onnx"), "--height", "50"]) == 2
    assert "multiples of the patch size 14" in capsys.readouterr().err
