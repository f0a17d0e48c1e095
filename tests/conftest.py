"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


# --- hub_server fixture (owner: Hub area, issue 8) --- begin ---
@pytest.fixture
def hub_server(monkeypatch, tmp_path_factory):
    """A Hub-compatible test server on 127.0.0.1 with huggingface_hub/transformers pointed at it.

    Fresh per test: empty repositories, a fresh ``HF_HOME`` (download cache included), Xet
    disabled, a token the server accepts. See tests/hub_server.py.
    """
    from hub_server import HubServer, configure_client

    with HubServer() as server:
        configure_client(monkeypatch, server, tmp_path_factory.mktemp("hf_home"))
        yield server
# --- hub_server fixture (owner: Hub area, issue 8) --- end ---


@pytest.fixture
def isolated_training_run():
    """One thread (tiny models run fastest so, and a busy machine cannot stall them), and a fresh
    accelerate state per test (it is a process-wide singleton: mixed precision is fixed once set)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state()
    GradientState._reset_state()
