"""The fixture generators themselves: weights and inputs regenerate as the manifests fingerprint them."""

import pytest

from parity import load_manifest, make_inputs, regenerate_weights


@pytest.mark.parametrize("fixture", ["salad", "selavpr", "cricavpr", "megaloc"])
def test_weights_and_inputs_regenerate_bit_exactly(fixture):
    manifest = load_manifest(fixture)
    weights = regenerate_weights(manifest)
    assert list(weights) == [entry["key"] for entry in manifest["params"]]
    for entry in manifest["params"]:
        assert weights[entry["key"]].double().sum().item() == pytest.approx(entry["check"]["sum"], rel=1e-9, abs=1e-9), entry["key"]
    inputs = make_inputs(manifest)
    for tensor in manifest["inputs"]["tensors"]:
        assert inputs[tensor["name"]].double().sum().item() == pytest.approx(tensor["check"]["sum"], rel=1e-9, abs=1e-9)
