"""``python -m benchmarks``: the benchmark suite's command line.

Usage::

    python -m benchmarks run                      # everything, full sizes (~1 h)
    python -m benchmarks run --quick              # CI smoke: counts, < 2 minutes
    python -m benchmarks run --only fanout,idle   # some workloads
    python -m benchmarks run --out /tmp/bench     # results elsewhere
    python -m benchmarks plots [RESULTS/bench.json]   # redraw the PNGs
    python -m benchmarks docs [RESULTS/bench.json]    # rewrite docs/benchmarks.md
    python -m benchmarks merge PART.json RESULTS/bench.json  # a re-run workload into a report

Workloads: fanout, users, idle, ingest, rest, cluster (see :mod:`benchmarks.runner`).
``python -m benchmarks workload NAME …`` is what ``run`` starts for each workload.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        from benchmarks.runner import run_main

        return run_main(rest)
    if command == "merge":
        from benchmarks.runner import merge_main

        return merge_main(rest)
    if command == "workload":
        from benchmarks.runner import workload_main

        return workload_main(rest)
    if command in ("plots", "docs"):
        from benchmarks.runner import DOCS, RESULTS

        path = Path(rest[0]) if rest else RESULTS / "bench.json"
        report = json.loads(path.read_text())
        if command == "plots":
            from benchmarks.plots import draw_all

            for png in draw_all(report, path.parent / "plots"):
                print(png)
        else:
            from benchmarks.report import write_markdown

            target = Path(rest[1]) if len(rest) > 1 else DOCS
            write_markdown(report, path, target)
            print(target)
        return 0
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
