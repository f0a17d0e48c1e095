"""What ``vprhub`` prints besides its results: warnings as one line naming the command, no
library progress bars (transformers' weight loading), nothing from a library about packages
vprhub does not use."""

from __future__ import annotations

import json
import shutil

from test_bad_input_cli import run_cli, workspace  # noqa: F401  (the fixture)


def build_copy(workspace, tmp_path, *flags: str, broken: bool = True):  # noqa: F811
    """``vprhub index build --quiet`` of a copy of the workspace photos (``photos/broken.jpg``
    not a photo, when ``broken``) into ``map.vprindex``: the result and the photos folder."""
    photos = tmp_path / "photos"
    if not photos.exists():
        shutil.copytree(workspace / "photos", photos)
    if broken:
        (photos / "broken.jpg").write_bytes(b"not a photo")
    result = run_cli(
        "index", "build", "--model", str(workspace / "model"), "--images", str(photos), "--out", "map.vprindex",
        "--quiet", *flags, cwd=tmp_path,
    )
    return result, photos


def test_index_build_quiet_prints_results_and_one_line_warnings(workspace, tmp_path):  # noqa: F811
    result, photos = build_copy(workspace, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"vprhub index: warning: skipping {photos / 'broken.jpg'}: cannot read image {photos / 'broken.jpg'}: "
        "not an image format Pillow can read"
    ]
    assert result.stdout.splitlines()[0].startswith("indexed 4 of 5 files")


def test_milvus_build_and_search_print_no_client_notes(workspace, tmp_path):  # noqa: F811
    """No gRPC notes about forks (the decoding workers) nor pymilvus' note on milvus-lite's timestamps."""
    model, photos = str(workspace / "model"), str(workspace / "photos")
    built = run_cli("index", "build", "--model", model, "--images", photos, "--backend", "milvus", "--uri", "m.db",
                    "--quiet", "--num-workers", "1", cwd=tmp_path)
    assert built.returncode == 0 and built.stderr == "", built.stderr
    query = str(next((workspace / "photos").iterdir()))
    found = run_cli("search", "--index", "m.db", query, "--top-k", "1", cwd=tmp_path)
    assert found.returncode == 0 and found.stderr == "", found.stderr


def test_onnx_export_says_nothing_about_torchvision(workspace, tmp_path):  # noqa: F811
    result = run_cli("export", "onnx", str(workspace / "model"), "m.onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("wrote m.onnx: pixel_values [1, 3, 56, 56] float32 -> descriptors")


def test_a_build_names_the_users_links_not_their_targets(workspace, tmp_path):  # noqa: F811
    photos = tmp_path / "photos"
    shutil.copytree(workspace / "photos", photos)
    (photos / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    first = sorted(p for p in (workspace / "photos").rglob("*") if p.is_file())[0]
    (photos / "linked.jpg").symlink_to(first)
    result, _ = build_copy(workspace, tmp_path, broken=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"vprhub index: warning: skipping {photos / 'broken.jpg'}: cannot read image {photos / 'broken.jpg'}: "
        "a broken symbolic link"
    ]
    paths = [json.loads(line)["metadata"]["path"] for line in (tmp_path / "map.vprindex" / "entries.jsonl").open()]
    assert str(photos / "linked.jpg") in paths and str(first) not in paths


def test_an_index_option_the_model_cannot_fit_fails_before_embedding(workspace, tmp_path):  # noqa: F811
    result, _ = build_copy(workspace, tmp_path, "--compress", "pca100000-fp16")  # embedding broken.jpg would warn
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "vprhub index: error: PCA width 100000 must be between 1 and the descriptor width 160"  # 8 x 16 + 32
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no store was started


def test_an_interrupted_build_says_how_to_resume(workspace, tmp_path, monkeypatch, capsys):  # noqa: F811
    from vprhub.cli import main
    from vprhub.embedding import Embedder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C during embedding

    monkeypatch.setattr(Embedder, "embed_to_store", interrupted)
    out = tmp_path / "map.vprindex"
    argv = ["index", "build", "--model", str(workspace / "model"), "--images", str(workspace / "photos"),
            "--out", str(out), "--quiet"]
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"the finished shards stay in {tmp_path / '.map.vprindex.embeddings'}: run the same command again to resume",
        "vprhub index: interrupted",
    ]


def test_ctrl_c_while_the_command_imports_its_stack_is_one_line(monkeypatch, capsys):
    import vprhub.cli

    def interrupted(args):
        raise KeyboardInterrupt  # as Ctrl-C while torch / transformers are imported

    monkeypatch.setattr(vprhub.cli, "_calm_libraries", interrupted)
    assert vprhub.cli.main(["export", "onnx", "model", "out.onnx"]) == 130
    assert capsys.readouterr().err.splitlines() == ["vprhub export: interrupted"]


def test_search_table_escapes_control_characters_of_names_but_json_keeps_them(workspace, tmp_path, capsys):  # noqa: F811
    from vprhub.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    first = sorted((workspace / "photos").rglob("*.*"))[0]
    shutil.copy(first, photos / "a\nrank 1 forged\r.png")
    query = tmp_path / "q\x1b[2Jx.png"
    shutil.copy(first, query)
    build = ["index", "build", "--model", str(workspace / "model"), "--images", str(photos), "--out",
             str(tmp_path / "map.vprindex"), "--num-workers", "0", "--quiet"]  # fmt: skip
    assert main(build) == 0
    capsys.readouterr()
    assert main(["search", str(query), "--index", str(tmp_path / "map.vprindex"), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query {tmp_path}/q\\x1b[2Jx.png" and len(lines) == 3
    assert lines[2].endswith(f"path={photos}/a\\nrank 1 forged\\r.png"), lines
    assert main(["search", str(query), "--index", str(tmp_path / "map.vprindex"), "--top-k", "1", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == str(query) and result["hits"][0]["metadata"]["path"] == str(photos / "a\nrank 1 forged\r.png")
