"""The ``vprhub`` command: convert, index, search, eval, demo."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import USER_ERRORS

# Each module contributes its sub-commands through ``register(subparsers)``.
COMMAND_MODULES = (
    "vprhub.conversion.cli",
    "vprhub.pipelines.cli",
    "vprhub.evaluation.cli",
    "vprhub.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vprhub", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        return _report(args.command, error)
    except KeyboardInterrupt:
        print(f"vprhub {args.command}: interrupted", file=sys.stderr)
        return 130


def _report(command: str, error: BaseException) -> int:
    """A user error as one line on stderr (a bug keeps its traceback: it is not caught)."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"vprhub {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
