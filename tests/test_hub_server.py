"""The loopback Hub test server, driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import os

import pytest
from huggingface_hub import (
    HfApi,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_server import go_offline

REPO = "org/files"


def _write(folder, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def files(tmp_path):
    weights = os.urandom(3000)  # *.safetensors goes through LFS per .gitattributes
    content = {"config.json": b'{"a": 1}', "weights.safetensors": weights, "sub/notes.txt": b"hello\n"}
    folder = tmp_path / "upload"
    _write(folder, content)
    return folder, content


def test_upload_folder_is_one_commit_with_regular_and_lfs_files(hub_server, files):
    folder, content = files
    create_repo(REPO)
    info = upload_folder(repo_id=REPO, folder_path=folder, commit_message="add files")

    history = hub_server.commits(REPO)
    assert [c.message for c in history] == ["add files", "initial commit"]
    assert info.oid == history[0].sha
    stored = history[0].files
    assert {p: b.data for p, b in stored.items() if p != ".gitattributes"} == content
    assert stored["weights.safetensors"].lfs and not stored["config.json"].lfs
    # the LFS path really went through the batch endpoint + PUT upload
    methods = [m for m, _ in hub_server.requests]
    assert "PUT" in methods
    assert any(p.endswith(".git/info/lfs/objects/batch") for _, p in hub_server.requests)


def test_download_by_id_revision_and_sha(hub_server, files, tmp_path):
    folder, content = files
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    api.create_branch(REPO, branch="v1")
    (folder / "config.json").write_bytes(b'{"a": 2}')
    second = api.upload_folder(repo_id=REPO, folder_path=folder).oid
    assert first != second

    def read(revision=None):
        return open(hf_hub_download(REPO, "config.json", revision=revision), "rb").read()

    assert read() == b'{"a": 2}'
    assert read("v1") == b'{"a": 1}'
    assert read(first) == b'{"a": 1}'
    lfs_path = hf_hub_download(REPO, "weights.safetensors")
    assert open(lfs_path, "rb").read() == content["weights.safetensors"]
    # the cache names an LFS blob by its sha256, as for the real Hub
    assert os.path.basename(os.path.realpath(lfs_path)) == hashlib.sha256(content["weights.safetensors"]).hexdigest()

    snapshot = snapshot_download(REPO, revision="v1")
    assert open(os.path.join(snapshot, "sub", "notes.txt"), "rb").read() == b"hello\n"
    assert sorted(f.path for f in api.list_repo_tree(REPO, recursive=True)) == [
        ".gitattributes",
        "config.json",
        "sub",
        "sub/notes.txt",
        "weights.safetensors",
    ]
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "v1": first}
    assert api.model_info(REPO, revision="v1").sha == first


def test_unchanged_files_are_not_committed_again(hub_server, files):
    folder, _ = files
    create_repo(REPO)
    upload_folder(repo_id=REPO, folder_path=folder)
    upload_folder(repo_id=REPO, folder_path=folder)
    assert len(hub_server.commits(REPO)) == 2


def test_offline_after_one_pull(hub_server, files, monkeypatch):
    folder, content = files
    create_repo(REPO)
    upload_folder(repo_id=REPO, folder_path=folder)
    snapshot_download(REPO)
    hub_server.stop()
    go_offline(monkeypatch)
    assert open(hf_hub_download(REPO, "config.json"), "rb").read() == content["config.json"]
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/never-pulled", "config.json")


def test_errors_are_typed(hub_server, files):
    folder, _ = files
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    create_repo(REPO)
    upload_folder(repo_id=REPO, folder_path=folder)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    private = create_repo("org/private", private=True).repo_id
    upload_folder(repo_id=private, folder_path=folder)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private, "config.json", token=False)
    assert hf_hub_download(private, "config.json")
