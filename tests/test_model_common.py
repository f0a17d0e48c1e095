"""The transformers contract, checked the same way for every vprhub model class.

What transformers' ``ModelTesterMixin`` checks for its own models: save/load round trip,
half-precision loading, meta-device and missing-weight initialisation, determinism, batching
equivalence, ``return_dict``, hidden states, attention implementations, ``torch.export``; plus what
vprhub promises on top (saved folders load without vprhub, one ``mark_trainable``, adapters that can
be switched off and removed, bad pixel values refused). A new model type is one line in ``SPECS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.models.dinov2 import modeling_dinov2
from without_vprhub import run_without_vprhub

import vprhub
from vprhub.modeling import MODEL_CLASSES, mark_trainable
from vprhub.modeling.adapters import (
    adapter_modules,
    adapter_parameter_names,
    disabled_adapters,
    remove_adapters,
)
from vprhub.modeling.backbone import patch_grid, tiny_dinov2_config
from vprhub.modeling.pretrained import IncompleteWeightsError

DESCRIPTOR_ATOL = 1e-5  # the parity README's tolerance for descriptors


@dataclass(frozen=True)
class ModelSpec:
    """How to exercise one model type: extra forward arguments for batch-independent descriptors,
    submodules ``mark_trainable`` leaves frozen in training without their loss."""

    model_type: str
    independent: dict = field(default_factory=dict)
    frozen_without_loss: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.model_type


SPECS = [
    ModelSpec("salad"),
    ModelSpec("selavpr", frozen_without_loss=("local_head",)),
    ModelSpec("cricavpr", independent={"batch_mode": "independent"}),
    ModelSpec("megaloc"),
]


def test_every_model_class_is_covered():
    assert {spec.model_type for spec in SPECS} == set(MODEL_CLASSES)


@pytest.fixture(params=SPECS, ids=str)
def spec(request) -> ModelSpec:
    return request.param


def new_model(spec: ModelSpec, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return vprhub.build_model(spec.model_type, **overrides).eval()


def pixels(batch: int = 3, seed: int = 1, height: int = 56, width: int = 70) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def randomise(model, seed: int = 2) -> None:
    """Give every floating parameter a random value, as training would (adapters no longer neutral)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter + 0.05 * torch.randn(parameter.shape, generator=generator))


@torch.no_grad()
def descriptors(model, x, **kwargs) -> torch.Tensor:
    return model(x, **kwargs).descriptors


def constant_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers whose elements are all equal: those set by a constant rule."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        name: t.detach().clone()
        for name, t in tensors.items()
        if t.is_floating_point() and t.numel() > 1 and bool((t == t.flatten()[0]).all())
    }


# --- saving and loading ---------------------------------------------------------------------------
def test_save_load_round_trip_writes_the_code(spec, tmp_path):
    model = new_model(spec)
    randomise(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    module = type(model).__module__.split(".")[-1]
    assert config["auto_map"]["AutoModel"] == f"{module}.{type(model).__name__}"
    assert (tmp_path / f"{module}.py").is_file() and (tmp_path / f"configuration_{spec.model_type}.py").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    x = pixels()
    assert torch.equal(descriptors(loaded, x), descriptors(model, x))


def test_config_overrides_when_loading_are_validated(spec, tmp_path):
    """An impossible override fails when loading with the constructor's error, not later at save or forward."""
    new_model(spec).save_pretrained(tmp_path)
    for overrides in ({"image_size": [300, 300]}, {"pos_embed_rule": "nearest"}):
        with pytest.raises(StrictDataclassClassValidationError, match=next(iter(overrides))):
            AutoModel.from_pretrained(tmp_path, **overrides)
        with pytest.raises(StrictDataclassClassValidationError, match=next(iter(overrides))):
            AutoConfig.from_pretrained(tmp_path, **overrides)
    assert AutoConfig.from_pretrained(tmp_path, image_size=[98, 112]).image_size == [98, 112]


def test_folders_saved_after_any_load_work_without_vprhub(tmp_path):
    """build -> save -> from_pretrained -> save again: the second folder loads where vprhub cannot be imported."""
    x = pixels(batch=2)
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    for spec in SPECS:
        model = new_model(spec)
        randomise(model)
        model.save_pretrained(tmp_path / "first" / spec.model_type)
        reloaded = AutoModel.from_pretrained(tmp_path / "first" / spec.model_type)
        reloaded.save_pretrained(tmp_path / "second" / spec.model_type)
        expected[spec.model_type] = descriptors(model, x)
    script = """
import torch
from transformers import AutoModel

folder, names = sys.argv[1], sys.argv[2].split(",")
x = torch.load(f"{folder}/x.pt", weights_only=True)
out = {}
for name in names:
    model = AutoModel.from_pretrained(f"{folder}/second/{name}", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        out[name] = model(x).descriptors
torch.save(out, f"{folder}/out.pt")
"""
    result = run_without_vprhub(script, [str(tmp_path), ",".join(expected)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(remote[name], value, rtol=0, atol=DESCRIPTOR_ATOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loading_in_half_precision(spec, dtype, tmp_path):
    """Weights are the float32 ones rounded to ``dtype``; descriptors stay float32, unit length, and each
    image's half-precision descriptor is nearest to its own float32 descriptor."""
    model = new_model(spec)
    randomise(model)
    model.save_pretrained(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=dtype).eval()
    for name, parameter in half.named_parameters():
        assert parameter.dtype == dtype and torch.equal(parameter, model.get_parameter(name).to(dtype)), name
    x = pixels(batch=4)
    ours, reference = descriptors(half, x, **spec.independent), descriptors(model, x, **spec.independent)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(4), rtol=0, atol=DESCRIPTOR_ATOL)
    assert torch.equal((ours @ reference.T).argmax(dim=1), torch.arange(4))


# --- initialisation -------------------------------------------------------------------------------
def test_meta_device_init_sets_every_weight_by_the_rule(spec):
    reference = new_model(spec)
    with torch.device("meta"):
        model = type(reference)(reference.config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    model.init_weights()
    model.eval()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert not [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    for name, value in constant_tensors(reference).items():
        assert torch.equal(tensors[name], value), name
    x = pixels()
    with disabled_adapters(model.backbone):
        plain = descriptors(model, x)
    assert torch.equal(descriptors(model, x), plain)  # new adapters leave the backbone unchanged


def test_reshaped_weights_load_anew_only_when_asked(spec, tmp_path, caplog):
    """A weight of another shape is refused, unless ``ignore_mismatched_sizes=True``: then it alone is
    initialised anew, named in a warning, and every other weight is the checkpoint's."""
    trained = new_model(spec)
    randomise(trained)
    trained.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = sorted(k for k, v in weights.items() if not k.startswith("backbone.") and v.ndim >= 2)[0]
    weights[name] = torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteWeightsError, match=rf"of another shape \[{name}\].*ignore_mismatched_sizes=True"):
        AutoModel.from_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="vprhub.modeling.pretrained"):
        loaded = AutoModel.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert f"another shape: [{name}]" in caplog.text
    state = loaded.state_dict()
    assert state[name].shape == trained.state_dict()[name].shape and not torch.equal(state[name], trained.state_dict()[name])
    for key, tensor in trained.state_dict().items():
        if key != name:
            assert torch.equal(state[key], tensor), key


def test_weights_missing_from_a_checkpoint_get_the_init_rule(spec, tmp_path):
    """A checkpoint holding only the plain Dinov2 weights: the adapters and heads start as a new model's."""
    trained = new_model(spec)
    randomise(trained)
    trained.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    adapter_keys = {f"backbone.{name}" for name in adapter_parameter_names(trained.backbone)}
    assert adapter_keys <= set(weights)  # (Dinov2's own keys are saved under their legacy names)
    kept = {k: v for k, v in weights.items() if k.startswith("backbone.") and k not in adapter_keys}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteWeightsError, match=r"the weights do not fit its '\w+' config: missing \["):
        AutoModel.from_pretrained(tmp_path)  # strict unless the caller asks for the loading report
    loaded, report = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    loaded_state = loaded.state_dict()
    restored = {k for k in trained.state_dict() if k.startswith("backbone.") and k not in adapter_keys}
    assert report["missing_keys"] == set(trained.state_dict()) - restored and not report["unexpected_keys"]
    for key in restored:
        assert torch.equal(loaded_state[key], trained.state_dict()[key]), key
    fresh = constant_tensors(new_model(spec))
    tensors = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert set(fresh) - restored  # some weights were initialised, not loaded
    for name, value in fresh.items():
        if name not in restored:
            assert torch.equal(tensors[name], value), name
    x = pixels()
    with disabled_adapters(loaded.backbone):
        plain = descriptors(loaded, x)
    assert torch.equal(descriptors(loaded, x), plain)


# --- forward semantics ----------------------------------------------------------------------------
def test_forward_is_deterministic(spec):
    model, x = new_model(spec), pixels()
    assert torch.equal(descriptors(model, x), descriptors(model, x))


def test_batching_gives_the_descriptors_of_single_images(spec):
    model, x = new_model(spec), pixels(batch=3)
    batched = descriptors(model, x, **spec.independent)
    singles = torch.cat([descriptors(model, image[None], **spec.independent) for image in x])
    torch.testing.assert_close(batched, singles, rtol=0, atol=DESCRIPTOR_ATOL)


def test_dummy_inputs_and_input_embeddings_are_the_image_ones(spec):
    model = new_model(spec)
    dummy = model.dummy_inputs["pixel_values"]
    assert list(dummy.shape) == [1, 3, *model.config.image_size] and not dummy.any()
    assert len(model(**model.dummy_inputs).descriptors) == 1
    assert model.get_input_embeddings() is model.backbone.embeddings.patch_embeddings


def test_return_dict_false_gives_the_tuple(spec):
    model, x = new_model(spec), pixels()
    with torch.no_grad():
        output = model(x)
        as_tuple = model(x, return_dict=False)
        model.config.return_dict = False
        from_config = model(x)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    expected = output.to_tuple()
    assert len(as_tuple) == len(expected) == len(from_config)
    for ours, theirs, configured in zip(as_tuple, expected, from_config):
        assert torch.equal(ours, theirs) and torch.equal(configured, theirs)


def test_unknown_keyword_arguments_are_an_error(spec):
    model = new_model(spec)
    with pytest.raises(TypeError, match="output_attention"):
        model(pixels(), output_attention=True)


def test_hidden_states_are_the_backbone_layers(spec):
    model, x = new_model(spec), pixels()
    assert model(x).hidden_states is None
    with torch.no_grad():
        states = model(x, output_hidden_states=True).hidden_states
        embeddings = model.backbone.embeddings(x)
        layers = model.backbone.encoder.layer
        expected = [embeddings]
        for layer in layers:
            expected.append(layer(expected[-1]))
    assert len(states) == len(layers) + 1
    for ours, theirs in zip(states, expected):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bad", ["nan", "inf", "empty"])
def test_bad_pixel_values_are_refused(spec, bad):
    model, x = new_model(spec), pixels()
    if bad == "empty":
        x, message = x[:0], "empty batch"
    else:
        x[1, 0, 3, 4], message = float(bad), r"NaN or infinite values \(images \[1\]"
    with pytest.raises(ValueError, match=message):
        model(x)


def test_finite_pixels_whose_sum_overflows_are_accepted():
    """The finiteness check starts from a float32 sum; an overflowing sum of finite values is not an error."""
    config = tiny_dinov2_config()
    x = torch.full((2, 3, 14, 28), 3e38)
    assert not torch.isfinite(x.sum())
    assert patch_grid(x, config) == (1, 2)
    x[1, 2, 0, 27] = float("-inf")
    with pytest.raises(ValueError, match=r"images \[1\]"):
        patch_grid(x, config)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_is_honoured(spec, implementation, tmp_path, monkeypatch):
    model = new_model(spec)
    randomise(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
    assert loaded.config._attn_implementation == implementation
    assert loaded.config.backbone_config._attn_implementation == implementation
    calls = []
    eager = modeling_dinov2.eager_attention_forward
    monkeypatch.setattr(modeling_dinov2, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    x = pixels()
    ours = descriptors(loaded, x, **spec.independent)
    assert len(calls) == (len(loaded.backbone.encoder.layer) if implementation == "eager" else 0)
    torch.testing.assert_close(ours, descriptors(model, x, **spec.independent), rtol=0, atol=DESCRIPTOR_ATOL)


def test_torch_export_gives_the_same_descriptors(spec):
    model, x = new_model(spec), pixels(batch=2)
    program = torch.export.export(model, (x,), kwargs=spec.independent or None)
    with torch.no_grad():
        exported = program.module()(x, **spec.independent)
    torch.testing.assert_close(exported.descriptors, descriptors(model, x, **spec.independent), rtol=0, atol=DESCRIPTOR_ATOL)


# --- training and adapters -------------------------------------------------------------------------
def test_mark_trainable_gives_every_trained_parameter_a_gradient(spec):
    """Nothing frozen by construction or loading; after mark_trainable every trainable parameter gets a
    gradient from the descriptors (data-parallel training needs that) and mask_token never trains."""
    model = new_model(spec)
    assert all(p.requires_grad for p in model.parameters())
    trainable, total = mark_trainable(model, frozen=spec.frozen_without_loss)
    assert 0 < trainable < total
    assert not model.backbone.embeddings.mask_token.requires_grad
    model.train()
    model(pixels(batch=4)).descriptors.pow(2).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(model.get_parameter(n).numel() for n in trained) == trainable
    assert not [n for n in trained if model.get_parameter(n).grad is None]
    assert not [n for n, p in model.named_parameters() if n not in trained and p.grad is not None]


def test_adapters_can_be_disabled_and_removed(spec):
    model = new_model(spec)
    adapters = adapter_modules(model.backbone)
    if not adapters:
        assert remove_adapters(model.backbone) == []
        return
    randomise(model)
    x = pixels()
    plain = AutoModel.from_config(model.config.backbone_config)
    plain.embeddings = model.backbone.embeddings  # the same position rule and weights
    plain.encoder.load_state_dict(model.backbone.encoder.state_dict(), strict=False)
    plain.layernorm = model.backbone.layernorm
    with torch.no_grad():
        adapted = model(x, output_hidden_states=True).hidden_states[-1]
        with disabled_adapters(model.backbone):
            disabled = model(x, output_hidden_states=True).hidden_states[-1]
        expected = plain.eval()(x, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(disabled, expected) and not torch.allclose(adapted, expected)
    assert torch.equal(model(x, output_hidden_states=True).hidden_states[-1], adapted)  # back on after the block
    removed = remove_adapters(model.backbone)
    assert len(removed) == len(adapters)
    assert not [k for k in model.state_dict() if ".adapters." in k]
    with torch.no_grad():
        assert torch.equal(model(x, output_hidden_states=True).hidden_states[-1], expected)


def test_older_transformers_is_refused_with_the_version_needed(monkeypatch):
    """The modeling code (also as remote code on the Hub) names the transformers it needs."""
    import importlib.util

    import transformers

    from vprhub.modeling import configuration_common

    monkeypatch.setattr(transformers, "__version__", "5.19.0")
    spec = importlib.util.spec_from_file_location("configuration_common_copy", configuration_common.__file__)
    with pytest.raises(ImportError, match=r"require transformers >= 5\.20\.0, found 5\.19\.0"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
