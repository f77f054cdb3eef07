"""``mixlab compare CONFIG.toml --mixers a,b,... --seeds N --out DIR [--set key=value] [--jobs J]``."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train several mixing methods over several seeds and tabulate the paired results",
        description="Train every (method, seed) on the same data, model, budget and evaluation, "
        "as parallel subprocesses; finished runs are reused and interrupted ones resumed. Writes "
        "DIR/comparison.md and DIR/comparison.csv (differences are paired by seed). A "
        "[mixers.<name>] table is the [mixer] table of one method (apply, reference, "
        "[mixers.<name>.options]; reference may name another compared method, whose run of "
        "the same seed is then used); [compare] may hold mixers, seeds and baseline.",
    )
    p.add_argument(
        "config",
        nargs="?",
        help="TOML config: a train config plus optional "
        "[compare] and [mixers.<name>] tables (defaults are used for missing keys)",
    )
    p.add_argument(
        "--mixers",
        help="comma-separated methods, e.g. stratified,aioli "
        "(default: compare.mixers of the config)",
    )
    p.add_argument("--seeds", type=int, help="seeds per method (default: compare.seeds, else 1)")
    p.add_argument("--out", required=True, help="compare dir (runs, logs, tables)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run, e.g. --set train.steps=200 or "
        "--set mixers.aioli.options.eta=0.5 (repeatable)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="runs at once (default and maximum: CPU cores); each gets cores // jobs threads, "
        "unless train.threads is set (config or --set), which is kept (then the default jobs "
        "is cores // train.threads)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="delete and redo runs in DIR that were made with a different config",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.errors import ConfigError
    from mixlab.orchestrate.compare import compare, plan_compare
    from mixlab.orchestrate.scheduler import Progress

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}.")
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()] if args.mixers else None
    plan = plan_compare(args.config, args.out, args.overrides, mixers=mixers, seeds=args.seeds)
    result = compare(
        plan, jobs=args.jobs, progress=Progress(enabled=not args.quiet), force=args.force
    )
    if result.markdown:
        print(result.markdown)
        print(f"table: {plan.out / 'comparison.md'} and {plan.out / 'comparison.csv'}")
        print(f"report: mixlab report {plan.out} --out {plan.out / 'report'}")
    if result.failed:
        print(
            f"{len(result.failed)} run(s) did not finish: {', '.join(result.failed)} "
            f"(logs in {plan.out / 'logs'})"
        )
        return 1
    return 0
