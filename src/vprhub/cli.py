"""The ``vprhub`` command: convert, index, search, eval, demo."""

from __future__ import annotations

import argparse
import importlib
import sys

from huggingface_hub.errors import StrictDataclassError

# Each module contributes its sub-commands through ``register(subparsers)``.
COMMAND_MODULES = (
    "vprhub.conversion.cli",
    "vprhub.pipelines.cli",
    "vprhub.evaluation.cli",
    "vprhub.demo",
    "vprhub.serve.cli",
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
    except (ValueError, FileNotFoundError, FileExistsError, StrictDataclassError) as error:
        print(f"vprhub {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
