"""Longer fuzzing of the readers of outside files (the properties of
`tests/test_fuzz_readers.py` with more cases each), as JSON: cases tried, failures, seconds.

    python benchmarks/fuzz_readers.py [--examples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="Cases per reader and property.")
    args = parser.parse_args()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "test_fuzz_readers.py")],
        cwd=ROOT,
        env={**os.environ, "OPENAFM_FUZZ_EXAMPLES": str(args.examples)},
        capture_output=True,
        text=True,
    )  # fmt: skip
    counts = dict(
        (kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|error)", proc.stdout)
    )
    properties = counts.get("passed", 0) + counts.get("failed", 0)
    print(
        json.dumps(
            {
                "properties": properties,
                "cases": properties * args.examples,
                "failed_properties": counts.get("failed", 0) + counts.get("error", 0),
                "seconds": round(time.perf_counter() - start, 1),
                "failures": [
                    line for line in proc.stdout.splitlines() if line.startswith("FAILED")
                ],
            }
        )
    )
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
