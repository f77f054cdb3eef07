"""Check that README.md's demo table is the table a `make demo` run printed.

`mixlab demo --out RUN` writes its main table to RUN/table.md. This script compares it with the
table between the `<!-- demo-table:start -->` and `<!-- demo-table:end -->` markers of README.md:
same columns, same methods in the same order, and every cell equal as text, except the columns
that measure wall time ("wall time / run (s)", "time vs stratified"), which differ between two
runs of the same commit on the same machine (`--strict` compares them too).

    make demo                                          # writes runs/demo/table.md
    python benchmarks/check_readme_demo.py runs/demo   # exit 0: in step; 1: differ (diff shown)
    python benchmarks/check_readme_demo.py runs/demo --write   # copy the run's table into README

Exit status: 0 in step, 1 they differ, 2 a file or the README's markers are missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixlab.errors import MixlabError
from mixlab.report.demo_table import (
    TABLE_FILE,
    readme_differences,
    readme_table,
    replace_readme_table,
    table_diff,
)

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help=f"the demo's compare dir (holding {TABLE_FILE}) or a table file")
    ap.add_argument("--readme", default=str(REPO / "README.md"), help="default: %(default)s")
    ap.add_argument("--strict", action="store_true", help="compare the timing columns too")
    ap.add_argument("--write", action="store_true",
                    help="replace the README's demo table with the run's, then exit 0")
    args = ap.parse_args(argv)

    run = Path(args.run)
    table_path = run / TABLE_FILE if run.is_dir() else run
    readme_path = Path(args.readme)
    try:
        if not table_path.is_file():
            raise MixlabError(f"{table_path} does not exist: run `make demo` (or `mixlab demo "
                              f"--out {run}`) first.")
        run_table = table_path.read_text(encoding="utf-8")
        text = readme_path.read_text(encoding="utf-8")
        if args.write:
            readme_path.write_text(replace_readme_table(text, run_table, str(readme_path)),
                                   encoding="utf-8")
            print(f"{readme_path}: demo table replaced by {table_path}")
            return 0
        ours = readme_table(text, str(readme_path))
    except MixlabError as exc:
        print(f"check_readme_demo: error: {exc}", file=sys.stderr)
        return 2
    diffs = readme_differences(ours, run_table, strict=args.strict)
    if not diffs:
        timing = "" if args.strict else " (timing columns not compared)"
        print(f"{readme_path}: the demo table matches {table_path}{timing}")
        return 0
    print(f"{readme_path}: the demo table differs from {table_path}:")
    for line in diffs:
        print(f"  - {line}")
    print()
    print(table_diff(ours, run_table), end="")
    print(f"\nRegenerate it: python benchmarks/check_readme_demo.py {args.run} --write")
    return 1


if __name__ == "__main__":
    sys.exit(main())
