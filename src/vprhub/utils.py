"""Small helpers shared by the parts of vprhub that write to disk or open models."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, OutputNotWritableError, RefusedOverwriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A file or folder name has at most this many bytes on the usual file systems (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255
# What the longest temporary sibling adds to a name: ``.`` + ``.<pid>.<8 random>.tmp`` (pids below 10**10).
_SIBLING_EXTRA = len("." + ".0123456789.abcdefgh.tmp")


def temporary_stem(name: str) -> str:
    """``name`` as it appears in the names of its temporary siblings: itself, or when the siblings
    would pass ``NAME_MAX`` bytes, ``vprhub-`` and a hash of it (a legal name keeps legal temporaries)."""
    if len(name.encode()) + _SIBLING_EXTRA <= NAME_MAX:
        return name
    return "vprhub-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _temporary_prefix(path: Path) -> str:
    return f".{temporary_stem(path.name)}.{os.getpid()}."


@contextlib.contextmanager
def atomic_write_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``path`` for writing; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give the usual permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _name_output(error, path)
        raise


def _name_output(error: BaseException, path: Path) -> None:
    """Give a failed write that names no file (``file.write`` or numpy's short write on a full disk)
    the output ``path``."""
    if isinstance(error, OSError) and error.filename is None and _failed_write(error):
        error.filename = os.fspath(path)


# Failed writes that are about the disk (a write) or the path (any access), not a bug: one line each.
_DISK_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_PATH_FAILURES = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
_SHORT_WRITE = re.compile(r"(?P<asked>\d+) requested and (?P<written>\d+) written")  # numpy's tofile on a full disk


def _failed_write(error: OSError) -> str | None:
    """Why the disk or the path refused a write (``no space left on device``), or None for other errors."""
    if error.errno in _DISK_FAILURES | _PATH_FAILURES:
        return os.strerror(error.errno).lower()
    short = _SHORT_WRITE.fullmatch(str(error.args[0])) if len(error.args) == 1 else None
    return f"only {short['written']} of {short['asked']} bytes written (no space left on device?)" if short else None


def write_failure(error: OSError) -> str | None:
    """``cannot write PATH: no space left on device`` for a write refused by the disk, ``cannot open
    PATH: permission denied`` for a path refused (it may be read); PATH as the user named it, not its
    temporary. None for other errors."""
    reason = _failed_write(error)
    if error.filename is None or reason is None:
        return None
    parts = Path(os.fspath(error.filename)).parts
    path = Path(*(match["name"] if (match := _SIBLING.fullmatch(part)) else part for part in parts))
    return f"cannot {'open' if error.errno in _PATH_FAILURES else 'write'} {path}: {reason}"


# ---------------------------------------------------------------------- what vprhub wrote
@dataclass(frozen=True)
class FolderKind:
    """A kind of folder vprhub writes, and how ``--overwrite`` recognises one."""

    description: str  # e.g. "a vprhub place index (vprindex.json)"
    recognise: Callable[[Path], bool]


# What ``save_pretrained`` of a vprhub model and its image processor write (the modeling code
# it copies comes from ``vprhub/modeling``).
_MODEL_FILES = re.compile(
    r"config\.json|preprocessor_config\.json|model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors"
)


def _is_model_folder(path: Path) -> bool:
    """A vprhub model's ``config.json``, and nothing but files ``save_pretrained`` writes."""
    from . import modeling
    from .modeling import MODEL_CLASSES

    code = {p.name for p in Path(modeling.__file__).parent.glob("*.py")}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        ours = all(p.is_file() and (_MODEL_FILES.fullmatch(p.name) or p.name in code) for p in path.iterdir())
    except (OSError, ValueError):
        return False
    return ours and isinstance(config, dict) and config.get("model_type") in MODEL_CLASSES


MODEL_FOLDER = FolderKind("a vprhub model folder (config.json of a vprhub model)", _is_model_folder)


def holds_only(path: Path, names: re.Pattern) -> bool:
    """Whether every entry of ``path`` has a name in ``names`` (or is an atomic-write temporary of one)."""
    for entry in path.iterdir():
        sibling = _SIBLING.fullmatch(entry.name)
        if not names.fullmatch(sibling["name"] if sibling else entry.name):
            return False
    return True


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _contains(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def check_writable(path: Path) -> None:
    """Refuse (``OutputNotWritableError``) an output ``path`` that cannot be written: a name longer
    than ``NAME_MAX`` bytes, or a nearest existing folder above it that is read-only or not writable."""
    size = len(path.name.encode())
    if size > NAME_MAX:
        raise OutputNotWritableError(f"cannot write {path}: its name has {size} bytes, at most {NAME_MAX} are allowed")
    folder = next(parent for parent in path.absolute().parents if parent.exists())
    if os.access(folder, os.W_OK | os.X_OK):
        return
    read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
    reason = "read-only file system" if read_only else "permission denied"
    raise OutputNotWritableError(f"cannot write {path}: {reason} ({folder} is not writable)")


def check_replaceable(
    path: str | os.PathLike,
    overwrite: bool = False,
    kind: FolderKind | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> None:
    """Refuse (``RefusedOverwriteError``) to write the folder ``path`` over anything but an
    earlier output of the same ``kind``.

    An empty or missing ``path`` is always fine; a non-empty one needs ``overwrite`` and must
    be recognised by ``kind``; a folder that holds (or is) one of ``inputs`` is never replaced;
    a symbolic link is refused, and so is a path that cannot be written (:func:`check_writable`).
    """
    path = Path(path)
    check_writable(path)
    if path.is_symlink():  # replacing would swap the link, never what it points to: refuse plainly
        raise RefusedOverwriteError(
            f"{path} is a symbolic link (to {os.readlink(path)}); give the folder itself or another path"
        )
    if path.exists() and not path.is_dir():
        raise RefusedOverwriteError(f"{path} exists and is not a folder")
    if not path.is_dir() or not any(path.iterdir()):
        return
    for item in inputs:
        if _contains(path, Path(item)):
            raise RefusedOverwriteError(f"refusing to write {path}: it holds the input {item}; choose another folder")
    if not overwrite:
        raise RefusedOverwriteError(f"{path} exists; pass --overwrite to replace it")
    if kind is None or not kind.recognise(path):
        expected = kind.description if kind is not None else "an earlier output of vprhub"
        raise RefusedOverwriteError(
            f"refusing to replace {path}: it is not {expected} holding only files vprhub wrote; --overwrite "
            "only replaces what vprhub wrote, so choose another folder or remove it yourself"
        )


@dataclass(frozen=True)
class FileKind:
    """A kind of file vprhub writes, and how ``--overwrite`` recognises one (cheaply)."""

    description: str  # e.g. "a vprhub pairs file (lines of two image names)"
    recognise: Callable[[Path], bool]


def check_replaceable_file(
    path: str | os.PathLike, overwrite: bool, kind: FileKind, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Refuse (``RefusedOverwriteError``) to write the file ``path`` over anything but an earlier
    output of the same ``kind``; meant to run before any work.

    A folder, or a path below a file, is refused; an existing file needs ``overwrite`` and must
    be recognised by ``kind``; one of ``inputs`` is never replaced; a path that cannot be written
    is refused (:func:`check_writable`).
    """
    path = Path(path)
    if path.is_dir():
        raise RefusedOverwriteError(f"{path} is a folder; give the file to write")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise RefusedOverwriteError(f"cannot write {path}: {blocking} is a file, not a folder")
    check_writable(path)
    if not path.exists():
        return
    if any(path.resolve() == Path(item).resolve() for item in inputs):
        raise RefusedOverwriteError(f"refusing to write {path}: it is one of the inputs; choose another file")
    if not overwrite:
        raise RefusedOverwriteError(f"{path} exists; pass --overwrite to replace it")
    if not kind.recognise(path):
        raise RefusedOverwriteError(
            f"refusing to replace {path}: it is not {kind.description}; --overwrite only replaces what vprhub "
            "wrote, so choose another file or remove it yourself"
        )


# ---------------------------------------------------------------------- atomic folders
# Siblings of ``name`` while it is being written: ``.name.<pid>.<random>.tmp`` (the new content),
# ``.name.old-<pid>`` (the previous content, between two renames), ``.name.trash-<pid>`` (being deleted);
# ``name`` there is its :func:`temporary_stem`.
_SIBLING = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)\.[^.]+\.tmp|(?P<state>old|trash)-(?P<spid>\d+))")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _dead_siblings(path: Path) -> list[tuple[str, Path]]:
    """``(state, sibling)`` for the temporaries of ``path`` left by processes that no longer run."""
    if not path.parent.is_dir():
        return []
    found = []
    for sibling in path.parent.iterdir():
        match = _SIBLING.fullmatch(sibling.name)
        if not match or match["name"] != temporary_stem(path.name):
            continue
        pid = int(match["pid"] or match["spid"])
        if pid != os.getpid() and not _process_alive(pid):
            found.append((match["state"] or "tmp", sibling))
    return found


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what a killed :func:`atomic_write_dir` left around ``path``.

    If ``path`` is missing but the previous content waits in ``.name.old-<pid>`` (a crash
    between the two renames), it is put back; stale temporaries of dead processes are deleted.
    """
    path = Path(path)
    leftovers = _dead_siblings(path)
    olds = sorted((p for state, p in leftovers if state == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(path):
        os.replace(olds.pop(), path)
    for state, sibling in leftovers:
        if sibling.exists() and (state != "old" or sibling in olds):
            shutil.rmtree(sibling, ignore_errors=True)


@contextlib.contextmanager
def atomic_write_dir(
    path: str | os.PathLike,
    overwrite: bool = False,
    kind: FolderKind | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    What may be replaced is decided by :func:`check_replaceable` (``overwrite``, ``kind``,
    ``inputs``); the old content is only removed once the new one is complete, and what a
    killed earlier write left behind is recovered first (:func:`recover_dir`).
    """
    path = Path(path)
    recover_dir(path)
    check_replaceable(path, overwrite, kind, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{temporary_stem(path.name)}.old-{os.getpid()}")
            trash = path.with_name(f".{temporary_stem(path.name)}.trash-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            os.replace(old, trash)  # a complete ``.old`` exists only between the two renames
            shutil.rmtree(trash)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _name_output(error, path)
        raise


# ---------------------------------------------------------------------- folder or Hub id
def _looks_local(text: str) -> bool:
    """A path by its spelling (absolute, ``./``, ``~``, nested, or no valid Hub id), or one whose
    first component is an existing local folder (``runs/model`` where ``runs/`` exists)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "~", "/")) or "\\" in text or text.endswith("/") or os.path.isabs(text):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def resolve_source(source: str | os.PathLike, what: str = "model") -> str:
    """``source`` as an absolute local path when it exists, else as a Hub id.

    A local-looking path that does not exist raises ``ModelNotFoundError`` naming ``what``
    (e.g. ``"--model"``) instead of being looked up on the Hub. A folder whose save was killed
    between its two renames is restored first (:func:`recover_dir`).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        recover_dir(path)
    if path.exists():
        return str(path.resolve())
    if _looks_local(text):
        where = "" if str(path.resolve()) == text else f" ({path.resolve()})"
        raise ModelNotFoundError(f"{what} {text} not found: no such file or folder{where}")
    return text


@contextlib.contextmanager
def opening_source(source: str | os.PathLike, what: str = "model") -> Iterator[str]:
    """Resolve ``source`` (:func:`resolve_source`) and turn a failure to load it into one clear error.

    ``with opening_source(args.model, "--model") as model: AutoModel.from_pretrained(model)``:
    a Hub id that cannot be fetched (unknown, offline, network down) or a folder without the
    expected files raises ``ModelNotFoundError`` instead of a library traceback.
    """
    resolved = resolve_source(source, what)
    try:
        yield resolved
    except (OSError, ConnectionError) as error:
        if isinstance(error, (ModelNotFoundError, RefusedOverwriteError)):
            raise
        where = "local folder" if os.path.isabs(resolved) else "Hub id (no local folder of that name)"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if where.startswith("Hub") and "not a valid model identifier" in detail:
            detail += " (a private repository also needs a token: HF_TOKEN or `hf auth login`)"
        raise ModelNotFoundError(f"cannot open {what} {os.fspath(source)} as a {where}: {detail}") from None
