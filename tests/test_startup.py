"""``import vprhub`` and ``vprhub --help`` stay light; registration happens when transformers loads its Auto classes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import vprhub
from vprhub.cli import main as vprhub_main

HEAVY = ("torch", "faiss", "datasets", "accelerate", "pymilvus", "vprhub.pipelines", "vprhub.modeling.modeling_salad")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_and_help_load_nothing_heavy():
    out = run_python(
        f"""
        import sys, contextlib, io
        import vprhub
        from vprhub.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m in {HEAVY!r}))
        """
    )
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "order",
    ["import vprhub\nfrom transformers import AutoConfig, AutoModel", "from transformers import AutoConfig, AutoModel\nimport vprhub"],
    ids=["vprhub-first", "transformers-first"],
)
def test_auto_classes_and_pipeline_task_are_registered(order):
    out = run_python(
        order
        + """
from transformers.pipelines import PIPELINE_REGISTRY
config = AutoConfig.for_model("salad", backbone_config={"model_type": "dinov2", "hidden_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2}, num_clusters=2, cluster_dim=4, token_dim=4, head_hidden_dim=8)
print(type(config).__name__, type(AutoModel.from_config(config)).__name__,
      PIPELINE_REGISTRY.supported_tasks["place-recognition"]["impl"].__name__)
"""
    )
    assert out.split() == ["SaladConfig", "SaladModel", "PlaceRecognitionPipeline"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vprhub_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vprhub {vprhub.__version__}"


def test_public_names_and_submodules_resolve_on_first_use():
    from vprhub.modeling.modeling_salad import SaladModel

    assert vprhub.SaladModel is SaladModel
    assert callable(vprhub.hub.push_model) and callable(vprhub.build_model)
    assert all(getattr(vprhub, name) is not None for name in vprhub.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vprhub.nope
