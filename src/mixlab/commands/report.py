"""``mixlab report RUN_DIR_OR_COMPARE_DIR ... --out DIR``."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="plots, a Markdown summary and a self-contained HTML report of runs",
        description="Read one run dir, several run dirs, or a compare dir (mixlab compare --out) "
        "and write DIR/report.html (figures embedded), DIR/summary.md and the PNG figures: weight "
        "trajectories, validation loss per domain, the final comparison, tokens and repeats.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_COMPARE_DIR")
    p.add_argument("--out", required=True, help="report dir")
    p.add_argument("--title", default="mixlab report", help="title of the report")
    p.add_argument(
        "--all-seeds",
        action="store_true",
        help="one weight-trajectory panel per run (default: the lowest seed of each method)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.report.html import build_report, report_paths_or_error

    report = build_report(
        report_paths_or_error(args.paths), args.out, all_seeds=args.all_seeds, title=args.title
    )
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.html}")
    print(f"summary: {report.markdown}")
    print("figures: " + ", ".join(str(report.out / f.name) for f in report.figures))
    return 0
