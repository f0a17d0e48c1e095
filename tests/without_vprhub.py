"""Running a Python script in a subprocess where ``import vprhub`` fails (trust_remote_code tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

_BLOCKER = """
import importlib.abc, sys

class BlockVprhub(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vprhub":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

sys.meta_path.insert(0, BlockVprhub())
try:
    import vprhub
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("vprhub is importable")
"""
_CHECK = """
assert not [m for m in sys.modules if m.split(".")[0] == "vprhub"]
"""


def run_without_vprhub(script: str, args: list[str], folder: Path) -> subprocess.CompletedProcess:
    """Write ``script`` (after the vprhub blocker, before a check that vprhub stayed unloaded) and run it."""
    path = folder / "without_vprhub.py"
    path.write_text(_BLOCKER + textwrap.dedent(script) + _CHECK)
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=folder,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
