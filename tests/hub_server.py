"""A small Hugging Face Hub-compatible HTTP server for the tests. TEST SERVER ONLY.

It serves, on 127.0.0.1 and from memory, just the endpoints that `huggingface_hub` (2.x) and
`transformers` call to push and pull model repositories, so that the tests exercise the real
client code over real HTTP instead of mocks:

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml`` (parses the README front matter and its ``model-index``);
* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (repo info),
  ``/tree/{rev}[/{path}]``, ``/refs``, ``POST /branch/{name}``;
* ``POST /api/models/{repo}/preupload/{rev}``: a file is "lfs" when a ``filter=lfs`` pattern
  of the repo's ``.gitattributes`` matches it or it is 10 MiB or larger, "regular" otherwise;
* ``POST /{repo}.git/info/lfs/objects/batch`` (LFS "basic" transfer) and ``PUT /_lfs/{oid}``
  (the upload URL it hands out; content is checked against its sha256 and size);
* ``POST /api/models/{repo}/commit/{branch}``: the NDJSON commit (``header``, ``file`` in
  base64, ``lfsFile``, ``deletedFile``, ``deletedFolder``; ``parentCommit`` honoured);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob
  sha1; for LFS files the pointer's sha1 plus ``X-Linked-Etag``/``X-Linked-Size``),
  ``Content-Length`` and byte ranges.

Revisions are branch names, tags-free: a branch or any 40-hex commit sha of the repo.
Errors carry the ``X-Error-Code`` headers (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) from which `huggingface_hub` builds its typed exceptions. Writes need the
server's token; private repos need it for reads too. Only model repos; no pull requests; no
Xet (the client must run with Xet disabled, see `configure_client`).

`huggingface_hub` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and
``HF_HUB_DISABLE_XET`` once, at import, into module constants of `huggingface_hub.constants`;
the module-level ``huggingface_hub.hf_api.api`` (behind ``huggingface_hub.upload_folder`` &c.)
and transformers' cached ``transformers.utils.hub._hf_api`` keep the endpoint they were built
with. `configure_client` therefore patches those objects as well as the environment (which
subprocesses inherit); ``HF_TOKEN`` is read at call time.
"""

from __future__ import annotations

import base64
import datetime
import fnmatch
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.npy", "*.npz")
)
USER = "vprhub-tester"
_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with content ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A file of a commit: its content and whether it is stored through LFS."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """Git object id: of the content, or of the LFS pointer for LFS files."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a full commit sha points to."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision) if _COMMIT_SHA.match(revision) else None

    def history(self, branch: str = "main") -> list[Commit]:
        """Commits reachable from ``branch``, newest first."""
        commits, sha = [], self.branches.get(branch)
        while sha is not None:
            commits.append(self.commits[sha])
            sha = self.commits[sha].parent
        return commits


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubStore:
    """In-memory repositories, commits and LFS objects, guarded by one lock."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    def repo(self, repo_id: str, token_ok: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not token_ok):
            raise HubError(404, f"Repository {repo_id!r} not found", "RepoNotFound")
        return repo

    def commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, repo_id: str, private: bool, url: str) -> Repo:
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)
        repo = Repo(repo_id=repo_id, private=private, created=_now())
        self.repos[repo_id] = repo
        self.add_commit(repo, "main", "initial commit", {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode(), False)})
        return repo

    def add_commit(self, repo: Repo, branch: str, message: str, files: dict[str, Blob]) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\n".encode())
        commit = Commit(sha=digest.hexdigest(), parent=parent, message=message, files=files, date=_now())
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    @staticmethod
    def is_lfs(commit: Commit, path: str, size: int) -> bool:
        """Upload mode rule: a ``filter=lfs`` pattern of ``.gitattributes`` or a large file."""
        attributes = commit.files.get(".gitattributes")
        patterns = []
        if attributes is not None:
            for line in attributes.data.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) > 1 and "filter=lfs" in parts[1:]:
                    patterns.append(parts[0])
        name = path.rsplit("/", 1)[-1]
        return size >= LFS_SIZE_THRESHOLD or any(fnmatch.fnmatchcase(name, p) for p in patterns)


class HubServer:
    """The test server: ``with HubServer() as hub: ...`` or ``start()``/``stop()``."""

    def __init__(self, token: str = "hf_vprhub_test_token") -> None:
        self.token = token
        self.store = HubStore()
        self.requests: list[tuple[str, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the test Hub server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of a branch, newest first (for assertions)."""
        with self.store.lock:
            return self.store.repos[repo_id].history(branch)


class _HubHandler(BaseHTTPRequestHandler):
    """Routes requests to the store. ``hub`` is bound by `HubServer.start`."""

    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 60
    server_version = "vprhub-test-hub/1"

    ROUTES = [
        ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
        ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
        ("DELETE", re.compile(r"^/api/repos/delete$"), "delete_repo"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("GET", re.compile(rf"^/api/models/{_REPO}$"), "repo_info"),
        ("GET", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$"), "repo_info"),
        ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
        ("GET", re.compile(rf"^/api/models/{_REPO}/refs$"), "refs"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$"), "create_branch"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
        ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
        ("PUT", re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
        ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
        ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output quiet
        pass

    # --- plumbing -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.hub.requests.append((method, self.path))
        body = self._read_body()
        for route_method, pattern, name in self.ROUTES:
            match = pattern.match(parts.path)
            if route_method == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    with self.hub.store.lock:
                        getattr(self, f"_{name}")(body=body, **args)
                except HubError as err:
                    self._send_error(err)
                return
        self._send_error(HubError(404, f"the test Hub server has no route for {method} {parts.path}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _token_ok(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _require_token(self) -> None:
        if not self._token_ok():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send_json({"error": err.message, **err.extra}, err.status, headers)

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"request body is not JSON: {err}") from None

    def _writable(self, repo: str, rev: str) -> tuple[Repo, str]:
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "pull requests are not supported by the test Hub server")
        target = self.hub.store.repo(repo, True)
        if rev not in target.branches:
            raise HubError(404, f"Invalid rev id: {rev} (not a branch)", "RevisionNotFound")
        return target, rev

    # --- account and repos --------------------------------------------------------------------

    def _whoami(self, body: bytes) -> None:
        self._require_token()
        self._send_json({"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})

    def _create_repo(self, body: bytes) -> None:
        self._require_token()
        payload = self._json(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "the test Hub server only hosts model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.url}/{repo_id}"
        self.hub.store.create_repo(repo_id, private, url)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> None:
        self._require_token()
        payload = self._json(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        self.hub.store.repo(repo_id, True)
        del self.hub.store.repos[repo_id]
        self._send_json({})

    def _validate_yaml(self, body: bytes) -> None:
        from huggingface_hub.repocard_data import model_index_to_eval_results

        content = self._json(body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1)) or {}
                if not isinstance(metadata, dict):
                    errors.append("the metadata is not a YAML mapping")
                elif "model-index" in metadata:
                    model_index_to_eval_results(metadata["model-index"])
            except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
                errors.append(f"invalid metadata: {type(err).__name__}: {err}")
        status = 400 if errors else 200
        self._send_json({"errors": [{"message": e} for e in errors], "warnings": []}, status)

    def _repo_info(self, body: bytes, repo: str, rev: str = "main") -> None:
        target = self.hub.store.repo(repo, self._token_ok())
        commit = self.hub.store.commit_of(target, rev)
        self._send_json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "private": target.private,
                "disabled": False,
                "gated": False,
                "createdAt": target.created,
                "lastModified": commit.date,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, body: bytes, repo: str, rev: str, path: str = "") -> None:
        commit = self.hub.store.commit_of(self.hub.store.repo(repo, self._token_ok()), rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                blob = commit.files[file_path]
                entry = {"type": "file", "path": file_path, "oid": blob.oid, "size": len(blob.data)}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
                entries[file_path] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", commit.sha)
        self._send_json(list(entries.values()))

    def _refs(self, body: bytes, repo: str) -> None:
        target = self.hub.store.repo(repo, self._token_ok())
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in target.branches.items()]
        self._send_json({"branches": branches, "converts": [], "tags": []})

    def _create_branch(self, body: bytes, repo: str, branch: str) -> None:
        self._require_token()
        target = self.hub.store.repo(repo, True)
        if branch in target.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self.hub.store.commit_of(target, self._json(body).get("startingPoint") or "main")
        target.branches[branch] = start.sha
        self._send_json({})

    # --- upload -------------------------------------------------------------------------------

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        target, branch = self._writable(repo, rev)
        head = target.resolve(branch)
        files = []
        for item in self._json(body)["files"]:
            existing = head.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if self.hub.store.is_lfs(head, item["path"], item["size"]) else "regular",
                    "shouldIgnore": False,
                    "oid": None if existing is None else (existing.sha256 if existing.lfs else existing.oid),
                }
            )
        self._send_json({"files": files, "commitOid": head.sha})

    def _lfs_batch(self, body: bytes, repo: str) -> None:
        self._require_token()
        self.hub.store.repo(repo, True)
        payload = self._json(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "the test Hub server only supports LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.store.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/_lfs/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_upload(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match its sha256 {oid}")
        self.hub.store.lfs_objects[oid] = body
        self._send(200)

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        target, branch = self._writable(repo, rev)
        head = target.resolve(branch)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with a 'header' line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.sha:
            raise HubError(412, f"parentCommit {parent} is not the head of {branch} ({head.sha})")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.store.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} of {path} was never uploaded")
                files[path] = Blob(data, True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound", head.sha)
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        message = header.get("summary", "")
        if header.get("description"):
            message = f"{message}\n\n{header['description']}"
        commit = self.hub.store.add_commit(target, branch, message, files)
        self._send_json(
            {
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.sha}",
                "commitOid": commit.sha,
                "success": True,
                "pullRequestUrl": None,
            }
        )

    # --- download -----------------------------------------------------------------------------

    def _resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        commit = self.hub.store.commit_of(self.hub.store.repo(repo, self._token_ok()), rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.oid}"',
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        data, status = blob.data, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data):
                raise HubError(416, f"range start {start} is past the end of {path} ({len(data)} bytes)")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


def configure_client(monkeypatch: Any, server: HubServer, home: Path) -> None:
    """Point huggingface_hub and transformers (this process and subprocesses) at ``server``.

    ``home`` becomes ``HF_HOME``; the download cache is ``home / "hub"`` and the
    remote-code module cache ``home / "modules"``. Xet is disabled and offline mode off.
    """
    from huggingface_hub import constants, hf_api

    import transformers.dynamic_module_utils
    import transformers.utils.hub

    cache, modules = home / "hub", home / "modules"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_MODULES_CACHE": str(modules),
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    patched = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    for module in (transformers.utils.hub, transformers.dynamic_module_utils):
        monkeypatch.setattr(module, "HF_MODULES_CACHE", str(modules))


def go_offline(monkeypatch: Any) -> None:
    """``HF_HUB_OFFLINE=1`` for this process (patched constant) and its subprocesses (env)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
