"""`make mutate`'s verdict: the share of mutants of chatd/wire and chatd/core that the
fast tests kill, the survivors by function, and exit 1 below the target.

Reads what `mutmut run` left in mutants/.  A mutant that changes no behaviour (an
equivalent mutant) is marked in the code with ``# pragma: no mutate`` and a reason,
so it is not made at all; every other survivor is a gap in the tests.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

TARGET = 0.90
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    stats = json.loads((ROOT / "mutants" / "mutmut-cicd-stats.json").read_text())
    total = stats["total"] - stats["skipped"]
    killed = stats["killed"] + stats["timeout"]
    score = killed / total if total else 0.0
    results = subprocess.run(
        [sys.executable, "-m", "mutmut", "results"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    by_function: collections.Counter[str] = collections.Counter()
    for line in results.splitlines():
        m = re.match(r"\s*(\S+)__mutmut_\d+: (survived|no tests)", line)
        if m:
            name = re.sub(r"\.xǁ(\w+)ǁ", r".\1.", m.group(1))
            by_function[re.sub(r"\.x_", ".", name)] += 1
    for name, n in by_function.most_common():
        print(f"{n:4d} left  {name}")
    print(
        f"mutation score: {killed} of {total} mutants killed ({score:.1%}; "
        f"{stats['survived']} survived, {stats['no_tests']} with no test); target {TARGET:.0%}"
    )
    return 0 if score >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
