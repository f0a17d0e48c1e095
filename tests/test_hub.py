"""Push and pull vprhub models through the loopback Hub test server (tests/hub_server.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, upload_file
from huggingface_hub.errors import StrictDataclassError
from hub_server import go_offline
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

import vprhub
from without_vprhub import run_without_vprhub
from parity import assert_close, load_expected, load_manifest, make_inputs, regenerate_weights, tolerance
from vprhub import hub
from vprhub.cli import main as vprhub_main
from vprhub.modeling import MODEL_CLASSES

MODEL_TYPES = sorted(MODEL_CLASSES)
# License of the official weights, read from the LICENSE file of each official repository.
OFFICIAL_LICENSES = {"salad": "gpl-3.0", "selavpr": "mit", "cricavpr": "mit", "megaloc": "mit"}
CONVERSION = {"checkpoint": "official.ckpt", "parity": {"max abs difference": 3e-6}}
EVAL_REPORT = {
    "model": "somewhere",
    "datasets": {
        "msls-val": {"dataset": "msls-val", "recall@1": 0.5, "recall@5": 0.75, "recall@10": 0.875, "num_queries": 8},
        "pitts30k": {"dataset": "pitts30k", "recall@1": 0.25, "recall@5": 0.5, "recall@10": 1.0, "num_queries": 4},
    },
}


def tiny(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = vprhub.build_model(model_type).eval()
    return model, vprhub.vpr_image_processor(*model.config.image_size)


def pixels(model, batch: int = 3, seed: int = 1) -> torch.Tensor:
    """A small batch: a 5 x 6 patch grid keeps the forward passes cheap."""
    patch = model.config.backbone_config.patch_size
    return torch.randn(batch, 3, 5 * patch, 6 * patch, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def descriptors(model, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).descriptors


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_push_then_pull_by_id_gives_identical_descriptors(hub_server, model_type, tmp_path):
    model, processor = tiny(model_type)
    repo = f"org/{model_type}-tiny"
    url = hub.push_model(model, processor, repo, conversion=CONVERSION)

    history = hub_server.commits(repo)
    assert len(history) == 2 and url.endswith(history[0].sha)  # one commit besides the repo creation
    files = set(history[0].files)
    expected_files = {"config.json", "model.safetensors", "preprocessor_config.json", "image_processing_vpr.py", "README.md"}
    assert expected_files | {f"modeling_{model_type}.py", f"configuration_{model_type}.py"} <= files
    assert history[0].files["model.safetensors"].lfs

    pulled = AutoModel.from_pretrained(repo)
    assert type(pulled) is type(model)
    inputs = pixels(model)
    assert torch.equal(descriptors(pulled, inputs), descriptors(model, inputs))
    pulled_processor = AutoImageProcessor.from_pretrained(repo)
    assert type(pulled_processor) is type(processor) and pulled_processor.resize_rule == processor.resize_rule
    assert pulled_processor.size == processor.size
    assert pulled_processor.image_mean == processor.image_mean and pulled_processor.image_std == processor.image_std
    # the folder's auto_map points at the files that travelled with it
    config = json.loads(history[0].files["config.json"].data)
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_{model_type}.{type(model.config).__name__}",
        "AutoModel": f"modeling_{model_type}.{type(model).__name__}",
    }
    # a plain save writes the same code files and auto_map
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == {name for name in files if name.endswith(".py")}
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == config["auto_map"]


def test_remote_code_loads_without_vprhub(hub_server, tmp_path):
    """A subprocess in which ``import vprhub`` fails loads every model with trust_remote_code=True."""
    expected = {}
    inputs = {}
    for model_type in MODEL_TYPES:
        model, processor = tiny(model_type)
        repo = f"org/{model_type}-remote"
        hub.push_model(model, processor, repo, conversion=CONVERSION)
        inputs[repo] = pixels(model, batch=2)
        expected[repo] = descriptors(model, inputs[repo])
    torch.save(inputs, tmp_path / "inputs.pt")
    script = """
        import torch
        from transformers import AutoModel

        inputs = torch.load(sys.argv[1], weights_only=True)
        out = {}
        for repo, pixels in inputs.items():
            model = AutoModel.from_pretrained(repo, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out[repo] = model(pixels).descriptors
        torch.save(out, sys.argv[2])
        """
    result = run_without_vprhub(script, [str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(remote) == set(expected)
    for repo, value in expected.items():
        torch.testing.assert_close(remote[repo], value, rtol=1e-5, atol=1e-6)


def test_offline_after_one_pull(hub_server, monkeypatch):
    model, processor = tiny("salad")
    hub.push_model(model, processor, "org/offline", conversion=CONVERSION)
    AutoModel.from_pretrained("org/offline")
    AutoImageProcessor.from_pretrained("org/offline")
    hub_server.stop()
    go_offline(monkeypatch)
    pulled = AutoModel.from_pretrained("org/offline")
    AutoImageProcessor.from_pretrained("org/offline")
    inputs = pixels(model)
    assert torch.equal(descriptors(pulled, inputs), descriptors(model, inputs))


def test_pipeline_by_repo_id(hub_server):
    model, processor = tiny("salad")
    hub.push_model(model, processor, "org/pipeline", conversion=CONVERSION)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 60, 3), dtype=np.uint8)) for i in range(3)]
    recognizer = pipeline("place-recognition", model="org/pipeline")
    vectors = np.stack(recognizer(images, batch_size=3))
    with torch.no_grad():
        expected = model(**processor(images, return_tensors="pt")).descriptors.numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)


def test_revisions(hub_server):
    first, processor = tiny("salad", seed=0)
    second, _ = tiny("salad", seed=1)
    repo = "org/revisions"
    url = hub.push_model(first, processor, repo, conversion=CONVERSION)
    first_sha = url.rsplit("/", 1)[-1]
    hub.push_model(second, processor, repo, conversion=CONVERSION, revision="v2", commit_message="second weights")
    assert hub_server.commits(repo, "v2")[0].message == "second weights"
    inputs = pixels(first)
    expected = {"first": descriptors(first, inputs), "second": descriptors(second, inputs)}
    assert not torch.equal(expected["first"], expected["second"])
    for revision, weights in ((None, "first"), ("main", "first"), (first_sha, "first"), ("v2", "second")):
        pulled = AutoModel.from_pretrained(repo, revision=revision)
        assert torch.equal(descriptors(pulled, inputs), expected[weights]), revision


def test_index_of_a_hub_model_searches_with_the_commit_it_was_built_with(hub_server, tmp_path, capsys):
    """An index records the Hub commit of its model; search loads that commit after the repo moves on."""
    first, processor = tiny("salad", seed=0)
    second, _ = tiny("salad", seed=1)
    repo = "org/indexed"
    first_sha = hub.push_model(first, processor, repo, conversion=CONVERSION).rsplit("/", 1)[-1]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (70, 84, 3), dtype=np.uint8)).save(images / f"{i}.png")
    index = tmp_path / "map.vprindex"
    assert vprhub_main(["index", "build", "--model", repo, "--images", str(images), "--out", str(index), "--quiet"]) == 0
    assert json.loads((index / "vprindex.json").read_text())["identity"]["revision"] == first_sha
    hub.push_model(second, processor, repo, conversion=CONVERSION, commit_message="other weights")
    capsys.readouterr()
    assert vprhub_main(["search", "--index", str(index), str(images / "1.png"), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert hits[0]["index"] == 1 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_plain_transformers_push_to_hub_round_trip(hub_server):
    model, processor = tiny("salad")
    model.push_to_hub("org/plain")
    processor.push_to_hub("org/plain")
    pulled = AutoModel.from_pretrained("org/plain")
    inputs = pixels(model)
    assert torch.equal(descriptors(pulled, inputs), descriptors(model, inputs))
    assert AutoImageProcessor.from_pretrained("org/plain").size == processor.size


def test_convert_cli_pushes_to_hub(hub_server, tmp_path):
    """`vprhub convert salad CKPT OUT --push-to-hub ID`, then the pulled model reproduces the official outputs."""
    manifest = load_manifest("salad")
    checkpoint = tmp_path / "dino_salad.ckpt"
    torch.save(regenerate_weights(manifest), checkpoint)
    argv = ["convert", "salad", str(checkpoint), str(tmp_path / "out"), "--push-to-hub", "org/salad-dinov2"]
    assert vprhub_main(argv) == 0
    files = hub_server.commits("org/salad-dinov2")[0].files
    card = ModelCard(files["README.md"].data.decode())
    assert card.data.license == "gpl-3.0" and "`dino_salad.ckpt`" in card.text
    model = AutoModel.from_pretrained("org/salad-dinov2")
    with torch.no_grad():
        out = model(make_inputs(manifest)["x224"]).descriptors
    assert_close(out, load_expected("salad")["x224.descriptor"], tolerance(manifest, "x224.descriptor"), "descriptor")


def test_repo_that_does_not_exist(hub_server):
    with pytest.raises(OSError, match="org/does-not-exist"):
        AutoModel.from_pretrained("org/does-not-exist")


def test_a_private_repo_without_token_is_one_line_that_mentions_the_token(hub_server, monkeypatch, capsys, tmp_path):
    model, processor = tiny("salad")
    hub.push_model(model, processor, "org/private", conversion=CONVERSION, private=True)
    monkeypatch.delenv("HF_TOKEN")
    capsys.readouterr()
    assert vprhub_main(["export", "onnx", "org/private", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/private" in err and "a private repository also needs a token" in err


def test_folder_with_missing_weights_is_refused_before_pushing(hub_server, tmp_path):
    model, processor = tiny("salad")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hub.push_folder(tmp_path / "model", "org/broken", conversion=CONVERSION)
    assert hub_server.requests == []


def test_config_from_a_newer_vprhub_is_refused(hub_server, tmp_path):
    model, processor = tiny("salad")
    hub.push_model(model, processor, "org/future", conversion=CONVERSION)
    config = json.loads(hub_server.commits("org/future")[0].files["config.json"].data)
    config["vprhub_version"] += 1
    upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id="org/future")
    with pytest.raises((ValueError, StrictDataclassError), match="newer vprhub") as error:
        AutoModel.from_pretrained("org/future")
    assert "upgrade vprhub" in str(error.value)


def test_card_field_that_cannot_be_filled_fails_before_pushing(hub_server, tmp_path, monkeypatch):
    model, processor = tiny("salad")
    template = (hub.CARDS_DIR / "salad.md").read_text()
    (tmp_path / "_sections.md").write_text((hub.CARDS_DIR / "_sections.md").read_text())
    (tmp_path / "salad.md").write_text(template + "\nWarm-up: {{ config.warmup_steps }}\n")
    monkeypatch.setattr(hub, "CARDS_DIR", tmp_path)
    with pytest.raises(ValueError, match="warmup_steps"):
        hub.push_model(model, processor, "org/card", conversion=CONVERSION)
    (tmp_path / "salad.md").write_text(template + "\n{% raw %}{{ left over }}{% endraw %}\n")
    with pytest.raises(ValueError, match="template marker"):
        hub.push_model(model, processor, "org/card", conversion=CONVERSION)
    with pytest.raises(ValueError, match="exactly one of conversion= or training="):
        hub.push_model(model, processor, "org/card")
    with pytest.raises(ValueError, match="recall@1 of 'msls-val' is 92.2"):
        bad_results = {"msls-val": {"recall@1": 92.2}}
        hub.push_model(model, processor, "org/card", conversion=CONVERSION, eval_results=bad_results)
    assert hub_server.requests == []


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_model_card_content(model_type, tmp_path):
    model, processor = tiny(model_type)
    report = tmp_path / "eval.json"
    report.write_text(json.dumps(EVAL_REPORT))
    text = hub.render_model_card(model, "org/card-test", processor, eval_results=report, conversion=CONVERSION)
    card = ModelCard(text)
    data = card.data
    assert data.license == OFFICIAL_LICENSES[model_type]
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert {"vprhub", "visual-place-recognition", model_type} <= set(data.tags)
    assert data.metrics == ["recall"] and data.model_name == "card-test"
    recalls = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    expected = {
        (name, key): round(100 * value, 2)
        for name, result in EVAL_REPORT["datasets"].items()
        for key, value in result.items()
        if key.startswith("recall@")
    }
    assert recalls == expected
    body = card.text
    assert "{{" not in text and "{%" not in text
    assert 'AutoModel.from_pretrained("org/card-test", trust_remote_code=True)' in body
    assert 'pipeline("place-recognition", model="org/card-test")' in body
    assert f"global descriptor of {model.config.descriptor_dim} values" in body
    assert "official.ckpt" in body and "3e-06" in body
    assert "| msls-val | 50.00 | 75.00 | 87.50 |" in body
    for field in ("image_size", "pos_embed_rule"):
        assert f"`{field}` | `{json.dumps(getattr(model.config, field))}`" in body
    assert "@inproceedings" in body.lower()


def test_model_card_of_trained_weights(tmp_path):
    model, processor = tiny("salad")
    text = hub.render_model_card(model, "org/trained", processor, training={"dataset": "GSV-Cities", "epochs": 4})
    card = ModelCard(text)
    assert card.data.datasets == ["GSV-Cities"] and card.data.eval_results is None
    assert "Trained with vprhub on GSV-Cities" in card.text and "| epochs | 4 |" in card.text
    assert "No benchmark was run" in card.text
