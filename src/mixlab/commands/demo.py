"""``mixlab demo [--out DIR]``: stratified against every dynamic mixer, from nothing to a report.

The three stages (corpus, comparison, report) are ``mixlab.orchestrate.demo.run_demo``; the
demo's table and the README's copy of it: ``mixlab.report.demo_table``.
"""

from __future__ import annotations

import argparse
from typing import Any

from mixlab.orchestrate.demo import DEFAULT_OUT


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="compare stratified with every dynamic mixer on the built-in corpus (CPU, minutes)",
        description="From a fresh install: prepare the built-in corpus (cached in $MIXLAB_CACHE, "
        "default ./data), compare stratified with every dynamic mixer on a small model, write "
        "the report, and print the table. Rerunning reuses what is done.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="compare dir (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method (default: 1)")
    p.add_argument("--jobs", type=int, help="runs at once (default: CPU cores)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the demo config, e.g. --set train.steps=200 (repeatable)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the packaged demo config, then exit"
    )
    p.set_defaults(run=run)



def run(args: argparse.Namespace) -> int:
    from mixlab.orchestrate.demo import demo_config_text, run_demo

    if args.print_config:
        print(demo_config_text(), end="")
        return 0
    demo = run_demo(args.out, seeds=args.seeds, jobs=args.jobs, overrides=args.overrides)
    plan, result, report = demo.plan, demo.result, demo.report
    print(result.markdown)
    if demo.table is not None:
        print(f"table: {demo.table.resolve()} (the README's demo table; check it with "
              f"`python benchmarks/check_readme_demo.py {plan.out}`)")
    print(f"report: {report.html.resolve()}")
    print(f"figures: {report.out.resolve()}/*.png; summary: {report.markdown.resolve()}")
    print(f"demo finished in {demo.seconds / 60:.1f} min")
    if result.failed:
        print(
            f"{len(result.failed)} run(s) did not finish: {', '.join(result.failed)} "
            f"(logs in {plan.out / 'logs'})"
        )
        return 1
    return 0
