"""Errors caused by what the user gave vprhub (files, folders, names, options).

The ``vprhub`` command prints these as one line and exits non-zero; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassError


class VprhubError(Exception):
    """A problem with the user's input that vprhub can name precisely."""


class ModelNotFoundError(VprhubError, FileNotFoundError):
    """A model folder that does not exist, or a Hub id that cannot be fetched."""


class RefusedOverwriteError(VprhubError, FileExistsError):
    """A write that would replace something vprhub did not write, or the inputs themselves."""


class OutputNotWritableError(VprhubError, OSError):
    """An output path that cannot be written: a read-only or unwritable folder, or a name too long."""


class NotAVprhubModelError(VprhubError, ValueError):
    """A model folder or Hub id whose config names another model type than vprhub's."""


class WeightsError(VprhubError, ValueError):
    """Model weights that are absent, damaged, pickled code, or do not fit the model's config."""


class ModelFileError(VprhubError, ValueError):
    """A model folder's JSON file (config, image processor, shard index) that is damaged or malformed."""


def short_error(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message, cut to ``limit`` characters (a library's message can be pages)."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# What the command line reports as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    VprhubError,
    StrictDataclassError,  # a config field of the wrong type
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
