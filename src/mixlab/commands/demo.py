"""``mixlab demo [--out DIR]``: stratified against every dynamic mixer, from nothing to a report.

1. corpus: the built-in corpus, prepared once into ``$MIXLAB_CACHE/builtin-v<vocab>`` (default
   cache: ``data/`` under the working dir); later runs find it up to date and skip this;
2. compare: the packaged ``configs/demo.toml`` for stratified and each mixer registered with
   ``dynamic = True``, in parallel processes (finished runs are reused on a rerun);
3. report: ``DIR/report/report.html`` (self-contained), ``summary.md`` and the PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_CONFIG = "demo.toml"
DEFAULT_OUT = "runs/demo"
CACHE_ENV = "MIXLAB_CACHE"


@dataclass
class DemoConfig:
    """The ``[demo]`` table of the demo config (everything else is a compare config)."""

    vocab_size: int = 2048
    """Ids of the tokenizer of the demo's copy of the built-in corpus."""


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


def demo_config_text() -> str:
    """The packaged demo config (``mixlab/configs/demo.toml``)."""
    return resources.files("mixlab").joinpath("configs", DEMO_CONFIG).read_text(encoding="utf-8")


def load_demo_config() -> dict[str, Any]:
    """The packaged demo config as a dict."""
    return tomllib.loads(demo_config_text())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "data")


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print(demo_config_text(), end="")
        return 0

    from mixlab.config import apply_overrides, from_dict
    from mixlab.data.prepare import PrepareConfig, prepare
    from mixlab.mixers.base import MIXERS, mixer_class
    from mixlab.report.compare import Progress, compare, plan_compare
    from mixlab.report.html import build_report

    start = time.monotonic()
    raw = apply_overrides(load_demo_config(), args.overrides)
    demo = from_dict(DemoConfig, raw.pop("demo", {}), "demo")

    data_dir = cache_dir() / f"builtin-v{demo.vocab_size}"
    _say(f"[1/3] built-in corpus -> {data_dir} (built once, then reused)")
    prepare(
        PrepareConfig(source="builtin", out=str(data_dir), vocab_size=demo.vocab_size),
        log=lambda msg: _say(f"      {msg}"),
        progress=True,
    )

    mixer_class("stratified")  # imports the registry
    dynamic = sorted(name for name, cls in MIXERS.items() if cls.dynamic)
    mixers = ["stratified", *dynamic]
    raw.setdefault("data", {})["dir"] = str(data_dir)
    raw["mixers"] = {k: v for k, v in raw.get("mixers", {}).items() if k in mixers}
    plan = plan_compare(None, args.out, mixers=mixers, seeds=args.seeds, raw=raw)
    steps = plan.specs[0].steps
    _say(
        f"[2/3] training {len(plan.specs)} runs ({', '.join(plan.mixers)} x {len(plan.seeds)} "
        f"seed(s), {steps} steps each) -> {plan.out}"
    )
    title = "mixlab demo: stratified vs. dynamic mixers on the built-in corpus"
    result = compare(plan, jobs=args.jobs, progress=Progress(), title=title)

    _say("[3/3] report")
    report = build_report([plan.out], plan.out / "report", title=title)
    took = time.monotonic() - start
    print(result.markdown)
    print(f"report: {report.html.resolve()}")
    print(f"figures: {report.out.resolve()}/*.png; summary: {report.markdown.resolve()}")
    print(f"demo finished in {took / 60:.1f} min")
    if result.failed:
        print(
            f"{len(result.failed)} run(s) did not finish: {', '.join(result.failed)} "
            f"(logs in {plan.out / 'logs'})"
        )
        return 1
    return 0
