"""The ``vprhub`` command: convert, index, search, eval, export, serve, demo."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from .errors import USER_ERRORS
from .utils import write_failure

# sub-command -> (module contributing it through ``register(subparsers)``, one-line help). A module is
# imported only when one of its commands runs, so ``vprhub --help`` and ``--version`` stay fast.
COMMANDS = {
    "convert": ("vprhub.conversion.cli", "convert a released official checkpoint into a save_pretrained folder"),
    "index": ("vprhub.pipelines.cli", "build a place index from a folder of images"),
    "search": ("vprhub.pipelines.cli", "find the places seen in query images"),
    "eval": ("vprhub.evaluation.cli", "recall@K of a model on VPR benchmarks"),
    "export": ("vprhub.export.cli", "export a model to ONNX"),
    "serve": ("vprhub.serve.cli", "a localisation service (HTTP API and a page) over a place index"),
    "demo": ("vprhub.demo", "train, index, search and plot on generated data (CPU, < 2 min)"),
}


def _version() -> str:
    from . import __version__

    return f"vprhub {__version__}"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, its module contributes the full sub-command parsers, otherwise
    every command is listed with its help only."""
    parser = argparse.ArgumentParser(prog="vprhub", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    else:
        for name, (_, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    try:  # importing a command's stack (torch, transformers, onnx) takes seconds: Ctrl-C may come here
        args = build_parser(command).parse_args(argv)
        _calm_libraries(args)
    except KeyboardInterrupt:
        return _interrupted(command)
    plain_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"vprhub {args.command}: warning: {message}\n"
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that went away is seen here, not at exit
        return status
    except BrokenPipeError:  # the reader went away (`vprhub eval --list-protocols | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (*USER_ERRORS, OSError) as error:
        failure = write_failure(error) if isinstance(error, OSError) else None
        if failure is None and not isinstance(error, USER_ERRORS):
            raise  # another OSError is a bug: it keeps its traceback
        return _report(args.command, failure or error)
    except KeyboardInterrupt:
        return _interrupted(args.command)
    finally:
        warnings.formatwarning = plain_format


def _interrupted(command: str | None) -> int:
    """Ctrl-C: one line and the shell's status for SIGINT, no traceback."""
    print(f"vprhub {command}: interrupted" if command else "vprhub: interrupted", file=sys.stderr)
    return 130


def _calm_libraries(args: argparse.Namespace) -> None:
    """No weight-loading bars from transformers (vprhub's own bars show the work); with
    ``--quiet``, no Hub download bars either. (Warnings print as one line naming the command.)"""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if getattr(args, "quiet", False):
        disable_progress_bars()


def _report(command: str, error: BaseException | str) -> int:
    """A user error (or its description) as one line on stderr (a bug keeps its traceback: it is not caught)."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"vprhub {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
