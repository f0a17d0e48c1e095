"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


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
