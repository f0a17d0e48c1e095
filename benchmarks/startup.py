"""Start-up cost of vprhub against plain transformers (seconds, median of fresh interpreters).

    python benchmarks/startup.py [--repeats 5]

Each figure is a new Python process running one statement; the "extra" column is what vprhub adds
to ``import transformers`` (the budget is 1 s for ``import vprhub`` and ``vprhub --help``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python": "pass",
    "import transformers": "import transformers",
    "import vprhub": "import vprhub",
    "vprhub --help": "import sys; from vprhub.cli import main; sys.argv = ['vprhub', '--help']; main()",
    "vprhub --version": "import sys; from vprhub.cli import main; sys.argv = ['vprhub', '--version']; main()",
    "from transformers import AutoModel": "from transformers import AutoModel",
    "import vprhub; from transformers import AutoModel": "import vprhub; from transformers import AutoModel",
}


def seconds(statement: str, repeats: int) -> float:
    """Median wall time of ``python -c statement`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=False, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per statement")
    args = parser.parse_args()
    results = {name: seconds(statement, args.repeats) for name, statement in STATEMENTS.items()}
    base = results["import transformers"]
    print(f"{'statement':<52} {'seconds':>8} {'extra vs import transformers':>30}")
    for name, value in results.items():
        print(f"{name:<52} {value:8.2f} {value - base:+30.2f}")


if __name__ == "__main__":
    main()
