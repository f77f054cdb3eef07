"""``mixlab demo``: stratified against every dynamic mixer, from nothing to a report.

1. corpus: the built-in corpus, prepared once into ``$MIXLAB_CACHE/builtin-v<vocab>`` (default
   cache: ``data/`` under the working dir); later runs find it up to date and skip this;
2. compare: the packaged ``configs/demo.toml`` for stratified and each mixer registered with
   ``dynamic = True``, in parallel processes (finished runs are reused on a rerun);
3. report: ``DIR/report/report.html`` (self-contained), ``summary.md`` and the PNGs, and
   ``DIR/table.md``: the main table alone, exactly as printed, which is what the README's demo
   table must be (``benchmarks/check_readme_demo.py DIR`` compares them; see
   ``mixlab.report.demo_table.readme_differences``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixlab.orchestrate.compare import ComparePlan, CompareResult
    from mixlab.report.html import Report

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_CONFIG = "demo.toml"
DEFAULT_OUT = "runs/demo"
CACHE_ENV = "MIXLAB_CACHE"
TITLE = "mixlab demo: stratified vs. dynamic mixers on the built-in corpus"


@dataclass
class DemoConfig:
    """The ``[demo]`` table of the demo config (everything else is a compare config)."""

    vocab_size: int = 2048
    """Ids of the tokenizer of the demo's copy of the built-in corpus."""


def demo_config_text() -> str:
    """The packaged demo config (``mixlab/configs/demo.toml``)."""
    return resources.files("mixlab").joinpath("configs", DEMO_CONFIG).read_text(encoding="utf-8")


def load_demo_config() -> dict[str, Any]:
    """The packaged demo config as a dict."""
    return tomllib.loads(demo_config_text())


def cache_dir() -> Path:
    """Where the demo's corpus is cached: ``$MIXLAB_CACHE``, else ``data/``."""
    return Path(os.environ.get(CACHE_ENV) or "data")


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


@dataclass
class DemoResult:
    """What a demo call made: the comparison, its report, and the table file."""

    plan: ComparePlan
    result: CompareResult
    """The comparison's outcome and table (``markdown``; ``failed``: runs that did not finish)."""
    report: Report
    """Where the report went (``html``, ``markdown``, the figures in ``out``)."""
    table: Path | None
    """``DIR/table.md``, or None when no run finished (no table)."""
    seconds: float
    """Wall time of the whole call."""


def run_demo(
    out: str | Path, seeds: int = 1, jobs: int | None = None, overrides: list[str] | None = None
) -> DemoResult:
    """Prepare the corpus (once), compare stratified with every dynamic mixer, write the report
    and ``DIR/table.md``; progress goes to stderr."""
    from mixlab.config import apply_overrides, from_dict
    from mixlab.data.prepare import PrepareConfig, prepare
    from mixlab.mixers.base import MIXERS, mixer_class
    from mixlab.orchestrate.compare import compare, plan_compare
    from mixlab.orchestrate.scheduler import Progress
    from mixlab.report.demo_table import write_table
    from mixlab.report.html import build_report

    start = time.monotonic()
    raw = apply_overrides(load_demo_config(), overrides or [])
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
    plan = plan_compare(None, out, mixers=mixers, seeds=seeds, raw=raw)
    steps = plan.specs[0].steps
    _say(
        f"[2/3] training {len(plan.specs)} runs ({', '.join(plan.mixers)} x {len(plan.seeds)} "
        f"seed(s), {steps} steps each) -> {plan.out}"
    )
    result = compare(plan, jobs=jobs, progress=Progress(), title=TITLE)

    _say("[3/3] report")
    report = build_report([plan.out], plan.out / "report", title=TITLE)
    took = time.monotonic() - start
    table = write_table(plan.out, result.markdown) if result.markdown else None
    return DemoResult(plan=plan, result=result, report=report, table=table, seconds=took)
