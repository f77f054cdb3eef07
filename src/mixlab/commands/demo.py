"""``mixlab demo [--out DIR]``: stratified against every dynamic mixer, from nothing to a report.

1. corpus: the built-in corpus, prepared once into ``$MIXLAB_CACHE/builtin-v<vocab>`` (default
   cache: ``data/`` under the working dir); later runs find it up to date and skip this;
2. compare: the packaged ``configs/demo.toml`` for stratified and each mixer registered with
   ``dynamic = True``, in parallel processes (finished runs are reused on a rerun);
3. report: ``DIR/report/report.html`` (self-contained), ``summary.md`` and the PNGs, and
   ``DIR/table.md``: the main table alone, exactly as printed, which is what the README's demo
   table must be (``benchmarks/check_readme_demo.py DIR`` compares them; see
   ``readme_differences``).
"""

from __future__ import annotations

import argparse
import difflib
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

from mixlab.errors import MixlabError

DEMO_CONFIG = "demo.toml"
DEFAULT_OUT = "runs/demo"
CACHE_ENV = "MIXLAB_CACHE"
TABLE_FILE = "table.md"
"""The demo's main table, written into the compare dir next to comparison.md."""
README_START = "<!-- demo-table:start -->"
README_END = "<!-- demo-table:end -->"
"""Marker comments around the demo table in README.md (the table is the lines between them
that start with ``|``)."""


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
    if result.markdown:
        table = write_table(plan.out, result.markdown)
        print(f"table: {table.resolve()} (the README's demo table; check it with "
              f"`python benchmarks/check_readme_demo.py {plan.out}`)")
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


# ---------------------------------------------------------------------------------------------
# The README's demo table and the table a demo run printed


def main_table(markdown: str) -> str:
    """The first Markdown table of ``markdown`` (compare's output: its main table), as the lines
    that start with ``|``, each without trailing spaces, ending with a newline."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("|")), None)
    if start is None:
        raise MixlabError("the demo's output has no Markdown table.")
    table = []
    for ln in lines[start:]:
        if not ln.lstrip().startswith("|"):
            break
        table.append(ln.strip())
    return "\n".join(table) + "\n"


def write_table(out: str | Path, markdown: str) -> Path:
    """Write ``OUT/table.md``: the main table of the demo's ``markdown``; returns its path."""
    path = Path(out) / TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(main_table(markdown), encoding="utf-8")
    return path


def _marker_lines(text: str, where: str) -> tuple[list[str], int, int]:
    lines = text.splitlines()
    found = {m: [i for i, ln in enumerate(lines) if ln.strip() == m] for m in (README_START, README_END)}
    for marker, at in found.items():
        if len(at) != 1:
            raise MixlabError(
                f"{where} must hold the line {marker} exactly once (found {len(at)} times)."
            )
    start, end = found[README_START][0], found[README_END][0]
    if end < start:
        raise MixlabError(f"{where}: {README_END} comes before {README_START}.")
    return lines, start, end


def readme_table(text: str, where: str = "README.md") -> str:
    """The table between the demo-table markers of the README ``text`` (its lines that start
    with ``|``), in the form ``main_table`` returns."""
    lines, start, end = _marker_lines(text, where)
    table = [ln.strip() for ln in lines[start + 1 : end] if ln.lstrip().startswith("|")]
    if not table:
        raise MixlabError(f"{where} has no table between {README_START} and {README_END}.")
    return "\n".join(table) + "\n"


def replace_readme_table(text: str, table: str, where: str = "README.md") -> str:
    """``text`` with the lines between the demo-table markers replaced by ``table`` (blank lines
    around it); everything outside the markers is kept byte for byte."""
    lines, start, end = _marker_lines(text, where)
    new = [*lines[: start + 1], "", *table.rstrip("\n").splitlines(), "", *lines[end:]]
    return "\n".join(new) + ("\n" if text.endswith("\n") else "")


def parse_table(table: str) -> tuple[list[str], list[list[str]]]:
    """A Markdown table -> (header cells, body rows of cells); the ``---`` separator row is
    dropped. Cells are stripped; a table cell never holds ``|`` in compare's output."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines()
            if ln.strip()]
    if not rows:
        return [], []
    body = [r for r in rows[1:] if not all(set(c) <= set("-: ") and c for c in r)]
    return rows[0], body


def is_timing_column(name: str) -> bool:
    """Columns that measure wall time, which differs between two runs of the same demo on the
    same machine (everything else in the table is a deterministic function of the runs)."""
    return name.startswith("wall time") or name.startswith("time vs ")


def readme_differences(readme: str, run: str, strict: bool = False) -> list[str]:
    """How the README's demo table ``readme`` differs from a demo run's ``table.md`` ``run``,
    one line per difference (empty = in step). The header and the methods must be the same, in
    the same order, and every cell equal as text, except the timing columns
    (``is_timing_column``) unless ``strict``."""
    head_r, rows_r = parse_table(readme)
    head_x, rows_x = parse_table(run)
    if head_r != head_x:
        return [f"the columns differ: README has {head_r}, the run has {head_x}."]
    out: list[str] = []
    names_r = [r[0].strip("*") for r in rows_r]
    names_x = [r[0].strip("*") for r in rows_x]
    if names_r != names_x:
        out.append(f"the methods differ: README has {names_r}, the run has {names_x}.")
    by_name = dict(zip(names_x, rows_x))
    for name, row in zip(names_r, rows_r):
        other = by_name.get(name)
        if other is None:
            continue
        if len(row) != len(head_r) or len(other) != len(head_r):
            out.append(f"row {name!r}: {len(row)} cells in README, {len(other)} in the run, "
                       f"{len(head_r)} columns.")
            continue
        for col, a, b in zip(head_r, row, other):
            if a != b and (strict or not is_timing_column(col)):
                out.append(f"row {name!r}, column {col!r}: README {a}, run {b}")
    return out


def table_diff(readme: str, run: str) -> str:
    """A unified diff from the README's table to the run's (for the eye; timing included)."""
    return "".join(difflib.unified_diff(
        readme.splitlines(keepends=True), run.splitlines(keepends=True),
        fromfile="README.md (demo table)", tofile="demo run (table.md)",
    ))
