"""The comparison table: per-method test metrics and paired differences from a baseline.

Every number comes from the runs' ``summary.json``. Differences are *paired*: a method's
average test perplexity at seed k minus the baseline's at seed k (same seed = same initial
model, same evaluation subsets, same data order within each domain), then mean and sample
standard deviation over the seeds both have. A method "beats" the baseline at a seed when its
difference is negative. A mean difference is marked *within noise* when
``|mean| <= 2 * std / sqrt(n)`` (two standard errors); with one seed the noise is unknown.

Differences are only taken between runs of the same *budget* (training steps and tokens: a
method trained twice as long is not "better" than the baseline's shorter run). When the
finished runs have several budgets, the comparison holds one group per budget (``groups``),
each with its own baseline chosen by the same rule, and the Markdown has one table per budget.

``comparison.csv`` has one row per run (``seed`` = the seed) followed by two rows per method
(``seed`` = "mean" and "std"); ``wins``, ``n_paired`` and ``within_noise`` are filled on the
"mean" rows; ``steps`` and ``tokens`` (the budget) on every row. With several budgets the rows
of each budget follow each other, each naming its own baseline.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mixlab.errors import MixlabError
from mixlab.report.runs import Run, summary_extra_steps

DEFAULT_BASELINE = "stratified"
NOISE_RULE = "|mean Δ| ≤ 2·std/√n (two standard errors of the paired differences)"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1) of some values; None where undefined."""

    mean: float | None
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[float | None]) -> Stat:
        vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not vals:
            return Stat(None, None, 0)
        arr = np.asarray(vals, dtype=np.float64)
        std = float(arr.std(ddof=1)) if arr.size > 1 else None
        return Stat(float(arr.mean()), std, int(arr.size))


@dataclass(frozen=True, order=True)
class Budget:
    """What a run was trained on: optimizer steps and training tokens (steps x batch x
    seq_len). Runs are paired only with runs of the same budget."""

    steps: int
    tokens: int

    @staticmethod
    def of(run: Run) -> Budget:
        s = run.summary or {}
        return Budget(int(s.get("steps") or 0), int(s.get("tokens") or 0))

    @property
    def text(self) -> str:
        out = f"{self.steps} steps"
        return out + (f", {self.tokens:,} training tokens per run" if self.tokens else "")


@dataclass(frozen=True)
class RunRow:
    """One finished run's numbers, with its paired differences from the baseline."""

    method: str
    seed: int
    avg_ppl: float
    avg_loss: float | None
    domain_ppl: dict[str, float]
    target_loss: float | None
    wall_time_s: float | None
    extra_steps: int
    steps: int
    tokens: int
    diff: float | None = None
    """avg_ppl minus the baseline's avg_ppl at the same seed (None: baseline run missing)."""
    target_diff: float | None = None
    time_ratio: float | None = None
    """wall_time_s / the baseline's wall_time_s at the same seed."""

    @property
    def total_steps(self) -> int:
        """Every training step the result cost: the run's own and its extra steps."""
        return self.steps + self.extra_steps


@dataclass(frozen=True)
class MethodRow:
    """A method's numbers over its seeds."""

    method: str
    seeds: list[int]
    avg_ppl: Stat
    domain_ppl: dict[str, Stat]
    diff: Stat
    diffs: dict[int, float]
    """Paired difference per seed."""
    wins: int
    """Seeds at which the method's average test perplexity is below the baseline's."""
    target_loss: Stat
    target_diff: Stat
    wall_time: Stat
    time_ratio: Stat
    extra_steps: Stat
    total_steps: Stat
    """The run's steps plus its extra steps: the compute the result cost, in training steps."""

    @property
    def within_noise(self) -> bool | None:
        """True when the mean paired difference is within two standard errors of 0."""
        if self.diff.n < 2 or self.diff.mean is None or self.diff.std is None:
            return None
        return abs(self.diff.mean) <= 2.0 * self.diff.std / math.sqrt(self.diff.n)


@dataclass
class Comparison:
    """Everything the Markdown and CSV tables show."""

    baseline: str
    baseline_note: str
    """Why this method is the baseline (for the table's footer)."""
    domains: list[str]
    methods: list[MethodRow]
    runs: list[RunRow]
    context: dict[str, Any] = field(default_factory=dict)
    """Budget and model facts shared by the runs (for the header)."""
    groups: list[Comparison] = field(default_factory=list)
    """With runs of several budgets: one comparison per budget (ascending), each paired within
    itself; ``methods`` and ``runs`` above are then theirs in that order, and ``baseline`` is the
    first group's. Empty when every run has the same budget."""

    @property
    def budgets(self) -> list[Budget]:
        return sorted({Budget(r.steps, r.tokens) for r in self.runs})

    @property
    def has_target(self) -> bool:
        return any(r.target_loss is not None for r in self.runs)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})


def _run_row(run: Run) -> RunRow:
    s = run.summary or {}
    test = s.get("test") or {}
    if test.get("avg_ppl") is None:
        raise MixlabError(f"{run.path}/summary.json has no test.avg_ppl.")
    ppl = test.get("ppl") or {}
    return RunRow(
        method=run.label or run.mixer,
        seed=run.seed,
        avg_ppl=float(test["avg_ppl"]),
        avg_loss=_opt_float(test.get("avg_loss")),
        domain_ppl={str(k): float(v) for k, v in ppl.items() if v is not None},
        target_loss=_opt_float(test.get("target_loss")),
        wall_time_s=_opt_float(s.get("wall_time_s")),
        extra_steps=summary_extra_steps(s, run.config),
        steps=int(s.get("steps") or 0),
        tokens=int(s.get("tokens") or 0),
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def choose_baseline(
    methods: Sequence[str], baseline: str | None = None, strict: bool = True
) -> tuple[str, str]:
    """(baseline, note): the given one, else stratified when present, else the first method.

    With ``strict=False`` a given baseline that is not among ``methods`` (a budget group
    without it) falls back to the rule instead of being an error.
    """
    if not methods:
        raise MixlabError("no finished run to compare.")
    if baseline and baseline != DEFAULT_BASELINE:
        if baseline in methods:
            return baseline, f"differences are from {baseline} (chosen as the baseline)"
        if strict:
            raise MixlabError(
                f"baseline '{baseline}' has no finished run; methods: {', '.join(methods)}."
            )
    if DEFAULT_BASELINE in methods:
        return DEFAULT_BASELINE, f"differences are from {DEFAULT_BASELINE} (uniform mixture)"
    return methods[0], (
        f"{DEFAULT_BASELINE} is not among the methods, so differences are from the first "
        f"method, {methods[0]}"
    )


def build_comparison(
    runs: Sequence[Run], baseline: str | None = None, order: Sequence[str] | None = None
) -> Comparison:
    """The comparison of the finished runs among ``runs`` (unfinished ones are left out).

    Methods appear in ``order`` (names not in it follow, in order of first appearance). Runs
    of different budgets are never paired: with several budgets the result has one group per
    budget (see ``Comparison.groups``).
    """
    finished = [r for r in runs if r.finished]
    if not finished:
        raise MixlabError("no finished run to compare.")
    by_budget: dict[Budget, list[Run]] = {}
    for r in finished:
        by_budget.setdefault(Budget.of(r), []).append(r)
    if len(by_budget) == 1:
        return _build_group(finished, baseline, order, strict=True)
    labels = sorted({r.label or r.mixer for r in finished})
    if baseline and baseline != DEFAULT_BASELINE and baseline not in labels:
        raise MixlabError(
            f"baseline '{baseline}' has no finished run; methods: {', '.join(labels)}."
        )
    groups = [
        _build_group(by_budget[b], baseline, order, strict=False) for b in sorted(by_budget)
    ]
    first = groups[0]
    return Comparison(
        baseline=first.baseline,
        baseline_note=first.baseline_note,
        domains=list(dict.fromkeys(d for g in groups for d in g.domains)),
        methods=[m for g in groups for m in g.methods],
        runs=[r for g in groups for r in g.runs],
        context={k: v for k, v in first.context.items() if k in ("model", "data_dir")},
        groups=groups,
    )


def _build_group(
    finished: Sequence[Run], baseline: str | None, order: Sequence[str] | None, strict: bool
) -> Comparison:
    """The comparison of finished runs that share one budget."""
    rows = [_run_row(r) for r in finished]
    methods: list[str] = [m for m in (order or []) if any(r.method == m for r in rows)]
    for r in rows:
        if r.method not in methods:
            methods.append(r.method)
    base, note = choose_baseline(methods, baseline, strict=strict)
    base_by_seed = {r.seed: r for r in rows if r.method == base}

    paired = [_with_pair(r, base_by_seed[r.seed]) if r.seed in base_by_seed else r for r in rows]
    paired.sort(key=lambda r: (methods.index(r.method), r.seed))

    domains: list[str] = []
    for run in finished:
        for d in run.domains:
            if d not in domains:
                domains.append(d)
    method_rows = [_method_row(m, [r for r in paired if r.method == m], domains) for m in methods]
    return Comparison(
        baseline=base,
        baseline_note=note,
        domains=domains,
        methods=method_rows,
        runs=paired,
        context=_context(finished),
    )


def _with_pair(r: RunRow, b: RunRow) -> RunRow:
    target_diff = (
        r.target_loss - b.target_loss
        if r.target_loss is not None and b.target_loss is not None
        else None
    )
    ratio = (
        r.wall_time_s / b.wall_time_s
        if r.wall_time_s is not None and b.wall_time_s not in (None, 0.0)
        else None
    )
    return dataclasses.replace(
        r, diff=r.avg_ppl - b.avg_ppl, target_diff=target_diff, time_ratio=ratio
    )


def _method_row(method: str, rows: list[RunRow], domains: list[str]) -> MethodRow:
    diffs = {r.seed: r.diff for r in rows if r.diff is not None}
    return MethodRow(
        method=method,
        seeds=[r.seed for r in rows],
        avg_ppl=Stat.of([r.avg_ppl for r in rows]),
        domain_ppl={d: Stat.of([r.domain_ppl.get(d) for r in rows]) for d in domains},
        diff=Stat.of(list(diffs.values())),
        diffs=diffs,
        wins=sum(1 for v in diffs.values() if v < 0),
        target_loss=Stat.of([r.target_loss for r in rows]),
        target_diff=Stat.of([r.target_diff for r in rows]),
        wall_time=Stat.of([r.wall_time_s for r in rows]),
        time_ratio=Stat.of([r.time_ratio for r in rows]),
        extra_steps=Stat.of([float(r.extra_steps) for r in rows]),
        total_steps=Stat.of([float(r.total_steps) for r in rows]),
    )


def _context(runs: Sequence[Run]) -> dict[str, Any]:
    """Facts for the header, from the first finished run (every run shares them in a compare)."""
    if not runs:
        return {}
    first = runs[0]
    cfg = first.config
    s = first.summary or {}
    model = cfg.get("model", {})
    data = cfg.get("data", {})
    train = cfg.get("train", {})
    ev = cfg.get("eval", {})
    return {
        "steps": s.get("steps"),
        "tokens": s.get("tokens"),
        "batch_size": train.get("batch_size"),
        "seq_len": data.get("seq_len"),
        "data_dir": data.get("dir"),
        "model": {k: v for k, v in model.items() if not isinstance(v, dict)},
        "test_windows": ev.get("test_windows"),
    }


# ---------------------------------------------------------------------------------------------
# Rendering


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pm(s: Stat, digits: int = 2, signed: bool = False) -> str:
    if s.mean is None:
        return "–"
    mean = f"{s.mean:+.{digits}f}" if signed else f"{s.mean:.{digits}f}"
    return mean if s.std is None else f"{mean} ± {s.std:.{digits}f}"


def _noise_mark(row: MethodRow) -> str:
    flag = row.within_noise
    if flag is None:
        return " (n=1)" if row.diff.n == 1 else ""
    return " ~" if flag else ""


def _model_text(model: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in model.items() if k in _MODEL_KEYS]
    return ", ".join(parts) if parts else ""


_MODEL_KEYS = ("kind", "d_model", "n_layer", "n_head", "hf_name", "name")


def to_markdown(cmp: Comparison, title: str = "Comparison") -> str:
    """The comparison as Markdown: header, main table, per-domain table, per-seed table, notes.

    With several budgets (``cmp.groups``): a line saying so, then one section per budget with
    its own tables, then the notes once."""
    if not cmp.groups:
        lines = [f"# {title}", "", *_group_lines(cmp, level=2)]
        return "\n".join(lines + _notes(cmp.baseline, cmp.baseline_note)) + "\n"
    texts = "; ".join(g.budgets[0].text for g in cmp.groups)
    lines = [
        f"# {title}",
        "",
        f"These runs have {len(cmp.groups)} different training budgets ({texts}): one table "
        "per budget. Runs of different budgets are not compared: differences are paired only "
        "between runs of the same budget and seed, from the baseline of that budget.",
        "",
    ]
    for k, g in enumerate(cmp.groups, 1):
        lines += [f"## Budget {k} of {len(cmp.groups)}: {g.budgets[0].text}", ""]
        lines += _group_lines(g, level=3)
        lines += [f"In this budget, {g.baseline_note}.", ""]
    return "\n".join(lines + _notes(None, "")) + "\n"


def _group_lines(cmp: Comparison, level: int) -> list[str]:
    """Facts, the main table and the per-domain and per-seed tables of one budget's comparison,
    sub-headings at Markdown ``level``."""
    n_seeds = len(cmp.seeds)
    base = cmp.baseline
    hashes = "#" * level
    lines: list[str] = []
    ctx = cmp.context
    facts = [f"{len(cmp.methods)} method(s) × {n_seeds} seed(s) ({', '.join(map(str, cmp.seeds))})"]
    if ctx.get("steps"):
        budget = f"{ctx['steps']} steps"
        if ctx.get("tokens"):
            budget += f", {int(ctx['tokens']):,} training tokens per run"
        facts.append(budget)
    if ctx.get("batch_size") and ctx.get("seq_len"):
        facts.append(f"batch {ctx['batch_size']} × {ctx['seq_len']} tokens")
    model = _model_text(ctx.get("model") or {})
    if model:
        facts.append(f"model {model}")
    if ctx.get("data_dir"):
        facts.append(f"data `{ctx['data_dir']}`")
    lines += ["; ".join(facts) + ".", ""]

    head = [
        "method",
        "avg test PPL",
        f"Δ PPL vs {base}",
        f"beats {base}",
    ]
    if cmp.has_target:
        head += ["target loss", f"Δ target loss vs {base}"]
    head += ["wall time / run (s)", f"time vs {base}", "extra steps", "total steps"]
    lines += [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for m in cmp.methods:
        is_base = m.method == base
        cells = [
            f"**{m.method}**" if is_base else m.method,
            _pm(m.avg_ppl),
            "baseline" if is_base else _pm(m.diff, signed=True) + _noise_mark(m),
            "–" if is_base else f"{m.wins}/{m.diff.n}",
        ]
        if cmp.has_target:
            cells += [
                _pm(m.target_loss, 4),
                "baseline" if is_base else _pm(m.target_diff, 4, signed=True),
            ]
        cells += [
            _pm(m.wall_time, 1),
            "1.00×" if is_base else (_num(m.time_ratio.mean) + "×" if m.time_ratio.mean else "–"),
            _num(m.extra_steps.mean, 0),
            _num(m.total_steps.mean, 0),
        ]
        lines.append(_row(cells))
    lines.append("")

    if cmp.domains:
        lines += [f"{hashes} Test perplexity per domain", ""]
        lines += [_row(["method", *cmp.domains]), _row(["---"] + ["---:"] * len(cmp.domains))]
        for m in cmp.methods:
            lines.append(_row([m.method] + [_pm(m.domain_ppl[d]) for d in cmp.domains]))
        lines.append("")

    if n_seeds > 1:
        lines += [f"{hashes} Paired difference from {base} per seed (average test PPL)", ""]
        seeds = cmp.seeds
        lines += [
            _row(["method", *[f"seed {s}" for s in seeds], "mean ± std", "within noise"]),
            _row(["---"] + ["---:"] * (len(seeds) + 2)),
        ]
        for m in cmp.methods:
            if m.method == base:
                continue
            noise = {None: "–", True: "yes", False: "no"}[m.within_noise]
            lines.append(
                _row(
                    [m.method]
                    + [_num(m.diffs.get(s)) if s in m.diffs else "–" for s in seeds]
                    + [_pm(m.diff, signed=True), noise]
                )
            )
        lines.append("")
    return lines


def _notes(base: str | None, baseline_note: str) -> list[str]:
    """The notes under the tables; ``base`` None: several budgets, each with its baseline."""
    who = base or "the baseline of its budget"
    return [
        "Notes:",
        "- Values are mean ± sample standard deviation over seeds; "
        + (f"{baseline_note}." if base else "each budget's baseline is named in its table."),
        f"- Δ is paired: method minus {who} at the same seed (same initial model, same "
        "evaluation subsets), then averaged over seeds; negative = lower perplexity = better.",
        f"- `~` marks a difference within noise: {NOISE_RULE}; `(n=1)`: one seed, noise unknown.",
        f"- Average test PPL is the mean of the per-domain test perplexities. "
        f"Time vs {who} is the mean over seeds of the paired ratio of wall times. "
        "Extra steps are training steps a method used outside its run: those of its reference "
        "model's run (DoReMi) or prior run (Aioli), branches it trained to measure (Skill-It), "
        "and proxy runs that chose its mixture (`mixlab sweep --final`, `mixlab doremi`), as "
        "the run's summary.json counts them; "
        "total steps = the run's own steps + extra steps, the compute behind the result.",
    ]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


CSV_BASE_FIELDS = [
    "method",
    "seed",
    "baseline",
    "steps",
    "tokens",
    "avg_test_ppl",
    "avg_test_loss",
    "diff_avg_ppl",
    "wins",
    "n_paired",
    "within_noise",
    "target_loss",
    "diff_target_loss",
    "wall_time_s",
    "time_ratio",
    "extra_steps",
    "total_steps",
]


def to_csv(cmp: Comparison) -> str:
    """The comparison as CSV (see the module docstring for the row layout)."""
    fields = CSV_BASE_FIELDS + [f"ppl_{d}" for d in cmp.domains]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for group in cmp.groups or [cmp]:
        _csv_rows(writer, group, cmp.domains)
    return buf.getvalue()


def _csv_rows(writer: csv.DictWriter, cmp: Comparison, domains: list[str]) -> None:
    """The rows of one budget's comparison; ``domains``: every group's (empty cells where a
    group lacks one)."""
    (budget,) = cmp.budgets or [Budget(0, 0)]
    for r in cmp.runs:
        writer.writerow(
            {
                "method": r.method,
                "seed": r.seed,
                "baseline": cmp.baseline,
                "steps": r.steps,
                "tokens": r.tokens,
                "avg_test_ppl": _csv(r.avg_ppl),
                "avg_test_loss": _csv(r.avg_loss),
                "diff_avg_ppl": _csv(r.diff),
                "target_loss": _csv(r.target_loss),
                "diff_target_loss": _csv(r.target_diff),
                "wall_time_s": _csv(r.wall_time_s),
                "time_ratio": _csv(r.time_ratio),
                "extra_steps": r.extra_steps,
                "total_steps": r.total_steps,
                **{f"ppl_{d}": _csv(r.domain_ppl.get(d)) for d in domains},
            }
        )
    for m in cmp.methods:
        for stat in ("mean", "std"):
            row: dict[str, Any] = {
                "method": m.method,
                "seed": stat,
                "baseline": cmp.baseline,
                "steps": budget.steps,
                "tokens": budget.tokens,
                "avg_test_ppl": _csv(getattr(m.avg_ppl, stat)),
                "diff_avg_ppl": _csv(getattr(m.diff, stat)),
                "target_loss": _csv(getattr(m.target_loss, stat)),
                "diff_target_loss": _csv(getattr(m.target_diff, stat)),
                "wall_time_s": _csv(getattr(m.wall_time, stat)),
                "time_ratio": _csv(getattr(m.time_ratio, stat)),
                "extra_steps": _csv(getattr(m.extra_steps, stat)),
                "total_steps": _csv(getattr(m.total_steps, stat)),
                **{f"ppl_{d}": _csv(getattr(m.domain_ppl[d], stat)) for d in cmp.domains},
            }
            if stat == "mean":
                row["wins"] = m.wins
                row["n_paired"] = m.diff.n
                row["within_noise"] = "" if m.within_noise is None else str(m.within_noise).lower()
            writer.writerow(row)


def _csv(v: float | None) -> str:
    return "" if v is None else repr(float(v))
