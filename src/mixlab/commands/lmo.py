"""``mixlab lmo RUN_DIR [RUN_DIR ...] --out DIR [--window W] [--ridge R] [--no-pool]``.

Fits the LMO framework's mixing laws (``mixlab.lmo``) to what runs logged and writes
``DIR/lmo.md``, ``DIR/lmo.json`` and PNG plots. ``lmo_section(run_dirs)`` returns the same
Markdown (as a report section) and the plots as PNG bytes, for ``mixlab report``.

What is read from each run (docs/architecture.md, "Run directory"):

- losses: the ``eval`` lines (split ``val``): per-domain loss at each evaluated step;
- the mixture p^t: the ``weights`` of the ``train`` lines, a snapshot every ``log_every``
  steps, averaged over the snapshots between two evaluations (exact for a mixture constant
  within each log window, or ``train.log_every = 1``). The law's p is the mixture the
  *gradient* follows, so two cases read another field: a DoReMi proxy that samples uniformly
  and weights the loss by α uses its logged α (``mixer.alpha``; the α logged at a step is
  the one the next step uses, a one-step shift), and a static method with
  ``mixer.apply = "loss"`` uses its static weights (``weights_final`` of summary.json; a run
  still training has none, and its intervals are left out);
- a method's own A: DoReMi's is diagonal, diag of the excess loss of its latest update
  (``mixer.excess``); Aioli's is its latest raw estimate (``mixer.A_raw``, in loss drop per
  probe of ``lp_steps`` steps; its normalised, smoothed ``mixer.A`` when no raw one is logged).
  Each is averaged over the train lines inside a window and compared, scale-free
  (``mixlab.lmo.compare_A``), with the A fitted on that run's window and on the pooled window.
- the static law uses the runs whose mixture never changed, at their last evaluation, among
  those with the most common number of steps (the law holds at one budget).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.errors import MixlabError
from mixlab.lmo import (
    ADistance,
    StaticFit,
    Transitions,
    WindowFit,
    compare_A,
    fit_dynamic,
    fit_static_law,
)

POOLED = "pooled"
MAX_CONDITION = 100.0
"""Fits whose mixture matrix has a larger condition number are not drawn and are flagged: the
noise of the loss changes, amplified that much, dominates their A."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lmo",
        help="fit the LMO mixing laws (linear dynamic, static log-linear) to logged runs",
        description="Fit the linear dynamic mixing law L^{t+1} = L^t - A^t p^t per window of "
        "evaluations (per run, and pooled across runs) and the static law L(p) = c + b "
        "exp(-A p) across runs on fixed mixtures; report fit quality per domain, the fitted A, "
        "and the distance between DoReMi's or Aioli's own A and the fitted one. Writes "
        "DIR/lmo.md, DIR/lmo.json and PNG plots.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run dirs (mixlab train --out) or compare dirs (mixlab compare --out)")
    p.add_argument("--out", required=True, help="output dir for lmo.md, lmo.json and plots")
    p.add_argument("--window", type=int, default=0, metavar="W",
                   help="transitions (intervals between consecutive evaluations) per window "
                   "of A^t; 0 = one window over the whole run (default)")
    p.add_argument("--ridge", type=float, default=0.0,
                   help="ridge penalty, relative to tr(P^T P)/m; 0 = least squares, "
                   "minimum-norm when the mixtures do not determine A (default)")
    p.add_argument("--no-pool", action="store_true",
                   help="do not fit the law on all runs' windows stacked together")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.errors import ConfigError

    if args.window < 0:
        raise ConfigError(f"--window must be >= 0, got {args.window}.")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise ConfigError(f"--ridge must be a finite number >= 0, got {args.ridge}.")
    result = analyse(args.runs, window=args.window, ridge=args.ridge, pool=not args.no_pool)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = result.images()
    for name, png in images.items():
        (out / name).write_bytes(png)
    md = f"# LMO: mixing laws fitted to {len(result.runs)} run(s)\n\n" + result.markdown(level=2)
    (out / "lmo.md").write_text(md, encoding="utf-8")
    (out / "lmo.json").write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    for label, fits in result.fits():
        good = sum(wf.fit.condition <= MAX_CONDITION for wf in fits)
        print(f"{label}: A determined in {good} of {len(fits)} window(s); mean R² of the "
              f"per-step loss change {_num(_mean_r2(fits))}")  # fmt: skip
    print(f"wrote {out / 'lmo.md'}, {out / 'lmo.json'} and {len(images)} plot(s)")
    return 0


def lmo_section(
    run_dirs: list[str | Path], window: int = 0, ridge: float = 0.0, pool: bool = True,
    level: int = 2,
) -> tuple[str, dict[str, bytes]]:  # fmt: skip
    """The LMO analysis of ``run_dirs`` (run dirs or compare dirs) as a report section.

    Returns (Markdown starting with a heading of ``level``, {file name: PNG bytes}); the
    Markdown links the images by those file names, so write them next to it.
    """
    result = analyse(run_dirs, window=window, ridge=ridge, pool=pool)
    return result.markdown(level=level), result.images()


# ---------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class RunData:
    """What the laws need from one run, in the domain order of the analysis."""

    label: str
    path: Path
    mixer: str
    domains: list[str]
    steps: int
    """Last evaluated step."""
    log_every: int | None
    eval_steps: np.ndarray
    """[E] steps of the val evaluations."""
    eval_losses: np.ndarray
    """[E, m] val loss per domain (NaN where missing)."""
    mix_steps: np.ndarray
    """[T] steps of the mixture snapshots."""
    mixtures: np.ndarray
    """[T, m] the mixture the gradient followed at those steps."""
    mixture_source: str
    avg_mixture: np.ndarray
    """[m] mixture averaged over the run."""
    constant: bool
    """The mixture never changed (a static run)."""
    method_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """[K] steps of the method's logged A."""
    method_A: np.ndarray | None = None
    """[K, m, m] the method's own A at those steps, or None."""
    method_source: str = ""

    @property
    def transitions(self) -> Transitions:
        return Transitions.from_log(self.eval_steps, self.eval_losses, self.mix_steps, self.mixtures)


def _vector(mapping: Any, domains: list[str]) -> np.ndarray:
    """[m] values of ``mapping`` in ``domains`` order; NaN for a missing or null entry."""
    if not isinstance(mapping, dict):
        return np.full(len(domains), np.nan)
    return np.array(
        [float(mapping[d]) if mapping.get(d) is not None else np.nan for d in domains]
    )


def _mixer_entry(line: dict[str, Any], key: str) -> Any:
    mixer = line.get("mixer")
    return mixer.get(key) if isinstance(mixer, dict) else None


def read_run(run: Any, label: str, domains: list[str]) -> RunData:
    """``run`` is a ``mixlab.report.runs.Run``; ``domains`` fixes the order of every array."""
    cfg = run.config if isinstance(run.config, dict) else {}
    mixer_cfg = cfg.get("mixer", {}) if isinstance(cfg.get("mixer"), dict) else {}
    options = mixer_cfg.get("options", {}) if isinstance(mixer_cfg.get("options"), dict) else {}
    mixer = run.mixer
    summary = run.summary or {}
    # Mixer reports are lists in the run's own domain order; this puts them in ``domains``'.
    own = list(run.domains)
    perm = np.array([own.index(d) for d in domains]) if sorted(own) == sorted(domains) else None

    def ordered(values: Any) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        if perm is None or v.shape[0] != len(domains):
            return np.full(v.shape, np.nan)
        return v[perm][:, perm] if v.ndim == 2 else v[perm]

    evals: dict[int, np.ndarray] = {}
    for line in run.evals:
        if line.get("split", "val") == "val" and isinstance(line.get("step"), int):
            evals[line["step"]] = _vector(line.get("loss"), domains)  # a repeated step: the last
    eval_steps = np.array(sorted(evals), dtype=np.int64)
    eval_losses = (
        np.stack([evals[s] for s in eval_steps]) if evals else np.zeros((0, len(domains)))
    )

    lines = [ln for ln in run.train if isinstance(ln.get("step"), int)]
    uniform_doremi = mixer == "doremi" and options.get("sampling", "uniform") == "uniform"
    if uniform_doremi and any(_mixer_entry(ln, "alpha") is not None for ln in lines):
        lines = [ln for ln in lines if _mixer_entry(ln, "alpha") is not None]
        mix = [ordered(_mixer_entry(ln, "alpha")) for ln in lines]
        source = "DoReMi's α (logged; it samples uniformly and weights the loss by α)"
    elif mixer_cfg.get("apply") == "loss":
        # The static weights weight the loss; the logged weights are the uniform sampling.
        w = _vector(summary.get("weights_final"), domains)  # NaN until summary.json exists
        mix = [w for _ in lines]
        source = "the static weights (mixer.apply = 'loss' weights the loss by them)"
    else:
        mix = [_vector(ln.get("weights"), domains) for ln in lines]
        source = "logged weights"
    mix_steps = np.array([ln["step"] for ln in lines], dtype=np.int64)
    mixtures = np.stack(mix) if mix else np.zeros((0, len(domains)))
    constant = bool(len(mixtures)) and bool(np.all(np.abs(mixtures - mixtures[0]) <= 1e-9))
    if source == "logged weights" and isinstance(summary.get("weights_avg"), dict):
        avg = _vector(summary["weights_avg"], domains)  # exact: averaged over every step
    else:
        avg = mixtures.mean(axis=0) if len(mixtures) else np.full(len(domains), np.nan)

    m = len(domains)
    method: list[tuple[int, np.ndarray]] = []
    method_source = ""
    if mixer == "doremi":
        for ln in lines:
            excess = _mixer_entry(ln, "excess")
            if excess is not None:
                method.append((ln["step"], np.diag(ordered(excess))))
        method_source = "DoReMi: diag(excess loss of its latest update)"
    elif mixer == "aioli":
        key = "A_raw" if any(_mixer_entry(ln, "A_raw") is not None for ln in lines) else "A"
        for ln in lines:
            if (A := _mixer_entry(ln, key)) is not None:
                method.append((ln["step"], ordered(A)))
        method_source = (
            "Aioli: its latest raw estimate A_raw" if key == "A_raw"
            else "Aioli: its normalised, smoothed A"
        )  # fmt: skip
    method = [(s, A) for s, A in method if A.shape == (m, m) and np.all(np.isfinite(A))]
    log_every = cfg.get("train", {}).get("log_every") if isinstance(cfg.get("train"), dict) else None
    return RunData(
        label=label,
        path=Path(run.path),
        mixer=mixer,
        domains=domains,
        steps=int(eval_steps[-1]) if len(eval_steps) else int(summary.get("steps", 0) or 0),
        log_every=int(log_every) if isinstance(log_every, int) else None,
        eval_steps=eval_steps,
        eval_losses=eval_losses,
        mix_steps=mix_steps,
        mixtures=mixtures,
        mixture_source=source,
        avg_mixture=avg,
        constant=constant,
        method_steps=np.array([s for s, _ in method], dtype=np.int64),
        method_A=np.stack([A for _, A in method]) if method else None,
        method_source=method_source if method else "",
    )


def _labels(runs: list[Any]) -> list[str]:
    """The report's run label, plus the seed when several runs share that label."""
    labels = [
        f"{r.label} seed{r.seed}" if sum(x.label == r.label for x in runs) > 1 else r.label
        for r in runs
    ]
    return [lab if labels.count(lab) == 1 else f"{lab} ({r.path})" for lab, r in zip(labels, runs)]


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    """Every run of ``run_dirs`` (run dirs or compare dirs), in one domain order."""
    from mixlab.report.runs import collect_runs

    runs = collect_runs(list(run_dirs))
    domains = runs[0].domains
    for r in runs[1:]:
        if sorted(r.domains) != sorted(domains):
            raise MixlabError(
                f"runs train on different domains ({runs[0].path}: {domains}; {r.path}: "
                f"{r.domains}); the laws are fitted on one set of domains."
            )
    if not domains:
        raise MixlabError(f"{runs[0].path} names no domain (no summary and no metrics).")
    return [read_run(r, lab, list(domains)) for r, lab in zip(runs, _labels(runs))]


# ---------------------------------------------------------------------------------------------
# The analysis


@dataclass
class Distance:
    run: str
    method: str
    window: int
    steps: tuple[int, int]
    reference: str
    """Which fit the method's A is compared with: the run's own fit or the pooled one."""
    method_A: np.ndarray
    fitted_A: np.ndarray
    condition: float
    """Condition number of the compared fit's mixtures (a large one: F is mostly noise)."""
    d: ADistance


@dataclass
class LmoResult:
    runs: list[RunData]
    window: int
    ridge: float
    per_run: dict[str, list[WindowFit]]
    """Run label -> its windows' fits (runs with at least one transition)."""
    pooled: list[WindowFit] | None
    static: StaticFit | None
    static_runs: list[str]
    distances: list[Distance]
    notes: list[str]

    @property
    def domains(self) -> list[str]:
        return self.runs[0].domains

    def fits(self) -> list[tuple[str, list[WindowFit]]]:
        """(name, windows) of every fit: the pooled one first, then each run's."""
        out = [(POOLED, self.pooled)] if self.pooled else []
        return out + list(self.per_run.items())

    # -------------------------------------------------------------- output

    def markdown(self, level: int = 2) -> str:
        return _markdown(self, "#" * level)

    def images(self) -> dict[str, bytes]:
        return _images(self)

    def to_json(self) -> dict[str, Any]:
        return _clean(_to_json(self))


def analyse(
    run_dirs: list[str | Path], window: int = 0, ridge: float = 0.0, pool: bool = True
) -> LmoResult:
    """Read the runs and fit both laws; every fit that the data allow is made."""
    runs = load_runs(run_dirs)
    notes: list[str] = []
    trans = {r.label: r.transitions for r in runs}
    per_run: dict[str, list[WindowFit]] = {}
    for r in runs:
        if len(trans[r.label]) == 0:
            notes.append(
                f"{r.label}: fewer than two evaluations with losses and a logged mixture between "
                "them; no dynamic fit (set eval.every so that a run evaluates several times)."
            )
            continue
        per_run[r.label] = fit_dynamic([trans[r.label]], window, ridge)
        if r.log_every and r.log_every > 1 and not r.constant:
            notes.append(
                f"{r.label}: its mixture changes and is logged every {r.log_every} steps, so the "
                "mean mixture between evaluations is estimated from those snapshots "
                "(train.log_every = 1 makes it exact)."
            )
    pooled = None
    usable = [r for r in runs if r.label in per_run]
    if pool and len(usable) > 1:
        pooled = fit_dynamic([trans[r.label] for r in usable], window, ridge)
        for wf in pooled:
            if len(set(wf.step_ranges)) > 1:
                notes.append(
                    f"pooled window {wf.index} covers different steps in different runs "
                    f"({sorted(set(wf.step_ranges))}): the runs' eval schedules differ."
                )
    notes += _conditioning_notes([(POOLED, pooled or []), *per_run.items()], len(runs[0].domains))
    static, static_runs = _static(runs, notes)
    distances = _distances(runs, per_run, pooled)
    return LmoResult(
        runs=runs, window=window, ridge=ridge, per_run=per_run, pooled=pooled, static=static,
        static_runs=static_runs, distances=distances, notes=notes,
    )  # fmt: skip


def _conditioning_notes(fits: list[tuple[str, list[WindowFit]]], m: int) -> list[str]:
    """One note per kind of weak window, naming the fits and windows concerned."""
    kinds: dict[str, list[str]] = {"exact": [], "low": [], "weak": []}
    for label, wfs in fits:
        for kind, test in (
            ("exact", _exact),
            ("low", lambda wf: wf.fit.rank < m),
            ("weak", lambda wf: wf.fit.rank == m and wf.fit.condition > MAX_CONDITION),
        ):
            if idx := [wf.index for wf in wfs if test(wf)]:
                kinds[kind].append(f"{label} {idx}")
    text = {
        "exact": "no more transitions than unknowns per domain, so the law fits them exactly "
        "and their fit quality says nothing (use a larger --window or evaluate more often)",
        "low": f"mixtures spanning fewer than {m} dimensions, so A is not identified (the "
        "minimum-norm solution is shown; pool runs with different mixtures, or use --ridge)",
        "weak": f"mixtures that barely vary (condition number above {MAX_CONDITION:g}), so "
        "noise dominates A (pool runs, or use --ridge)",
    }
    return [f"Windows with {text[k]}: {'; '.join(v)}." for k, v in kinds.items() if v]


def _static(runs: list[RunData], notes: list[str]) -> tuple[StaticFit | None, list[str]]:
    m = len(runs[0].domains)
    fixed = [
        r for r in runs
        if r.constant and len(r.eval_steps) and np.all(np.isfinite(r.eval_losses[-1]))
    ]  # fmt: skip
    if not fixed:
        notes.append("static law: no run on a fixed mixture with a final evaluation.")
        return None, []
    budgets = [r.steps for r in fixed]
    budget = max(set(budgets), key=lambda s: (budgets.count(s), s))
    chosen = [r for r in fixed if r.steps == budget]
    skipped = [r.label for r in fixed if r.steps != budget]
    if skipped:
        notes.append(f"static law: runs at another budget than {budget} steps left out: {skipped}.")
    P = np.stack([r.avg_mixture for r in chosen])
    Y = np.stack([r.eval_losses[-1] for r in chosen])
    distinct = len({tuple(np.round(p, 9)) for p in P})
    if len(chosen) < m + 2:
        notes.append(
            f"static law: needs at least {m + 2} runs on fixed mixtures at one budget (it has "
            f"{m + 1} parameters per domain); found {len(chosen)}."
        )
        return None, []
    if distinct < m + 1:
        notes.append(
            f"static law: the {len(chosen)} fixed-mixture runs use only {distinct} distinct "
            f"mixtures; at least {m + 1} are needed."
        )
        return None, []
    return fit_static_law(P, Y), [r.label for r in chosen]


def _distances(
    runs: list[RunData], per_run: dict[str, list[WindowFit]], pooled: list[WindowFit] | None
) -> list[Distance]:
    out = []
    for r in runs:
        if r.method_A is None or r.label not in per_run:
            continue
        for wf in per_run[r.label]:
            lo, hi = wf.step_ranges[0]
            inside = (r.method_steps > lo) & (r.method_steps <= hi)
            if not inside.any():
                continue
            M = r.method_A[inside].mean(axis=0)
            refs = [("own fit", wf)]
            if pooled:
                refs += [(POOLED + " fit", p) for p in pooled if p.index == wf.index]
            for name, ref in refs:
                out.append(Distance(
                    run=r.label, method=r.method_source, window=wf.index, steps=(lo, hi),
                    reference=name, method_A=M, fitted_A=ref.fit.A,
                    condition=ref.fit.condition, d=compare_A(M, ref.fit.A),
                ))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _exact(wf: WindowFit) -> bool:
    """No more transitions than the rank: the law interpolates them, R² = 1 says nothing."""
    return len(wf.fit.observed) <= wf.fit.rank


def _mean_r2(wfs: list[WindowFit]) -> float:
    """Mean in-sample R² over the windows (not interpolated) and domains where it is defined."""
    kept = [wf.fit.quality.r2 for wf in wfs if not _exact(wf)]
    r2 = np.concatenate(kept) if kept else np.zeros(0)
    return float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan")


def _num(v: float, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{0.0 if abs(v) < 0.5 * 10.0**-digits else v:.{digits}f}"  # no "-0.000"


def _cond(v: float) -> str:
    return "∞" if not math.isfinite(v) else (f"{v:.1f}" if v < 1e3 else f"{v:.1e}")


def _sci(v: float) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.2e}"


def _exponent(A: np.ndarray) -> int:
    """Power of ten that brings the largest |A_ij| into [1, 10) (0 when A is 0 or not finite)."""
    top = float(np.nanmax(np.abs(A))) if np.isfinite(A).any() else 0.0
    return math.floor(math.log10(top)) if top > 0 else 0


def _display_exponent(A: np.ndarray) -> int:
    """e such that A is shown as A / 10^e; 0 while the entries read well unscaled."""
    e = _exponent(A)
    return 0 if -1 <= e <= 1 else e


def matrix_table(A: np.ndarray, domains: list[str]) -> tuple[str, int]:
    """(Markdown table of A / 10^e, e): rows the loss of domain i, columns the share of
    domain j."""
    e = _display_exponent(A)
    scaled = np.asarray(A) / 10.0**e
    rows = [
        "| loss of ↓ / share of → | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for i, d in enumerate(domains):
        rows.append(f"| {d} | " + " | ".join(_num(float(v)) for v in scaled[i]) + " |")
    return "\n".join(rows), e


def _scale_text(e: int) -> str:
    return "" if e == 0 else f" (×10^{e})"


def _window_name(wf: WindowFit) -> str:
    lo = min(a for a, _ in wf.step_ranges)
    hi = max(b for _, b in wf.step_ranges)
    return f"window {wf.index} (steps {lo}–{hi})"


def _markdown(res: LmoResult, h: str) -> str:
    doms = res.domains
    m = len(doms)
    win = "one window per run" if res.window == 0 else f"windows of {res.window} transitions"
    out = [
        f"{h} Mixing laws (LMO)",
        "",
        f"Runs: {len(res.runs)}; {win}; ridge {res.ridge:g}. Linear dynamic law, per optimizer "
        "step: L_i^{t+1} = L_i^t − Σ_j A_ij p_j^t, fitted by least squares on the per-step "
        "loss change between consecutive evaluations, d^k = (L^{k+1} − L^k)/Δs = −A p̄^k, "
        "with p̄^k the mean mixture of the interval. Static law across runs on fixed mixtures: "
        "L_i(p) = c_i + b_i exp(−Σ_j A_ij p_j) (A centred: rows sum to 0, the only identified "
        "form on the simplex).",
        "",
        f"{h}# Runs",
        "",
        "| run | mixer | last step | evaluations | transitions | mixture used |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in res.runs:
        n = sum(len(wf.fit.observed) for wf in res.per_run.get(r.label, []))
        out.append(
            f"| {r.label} | {r.mixer} | {r.steps} | {len(r.eval_steps)} | {n} | "
            f"{r.mixture_source}{' (constant)' if r.constant else ''} |"
        )
    fits = res.fits()
    if fits:
        out += [
            "",
            f"{h}# Linear dynamic law: fit quality",
            "",
            "Per domain: R² / leave-one-out R² / MSE of the per-step loss change. `cond` is the "
            "condition number of the stacked mixtures (∞: they span fewer than "
            f"{m} dimensions and do not determine A; above {MAX_CONDITION:g}: noise dominates A).",
            "",
            "| fit | window | steps | transitions | cond | " + " | ".join(doms) + " |",
            "|---|---:|---|---:|---:|" + "---|" * m,
        ]
        for label, wfs in fits:
            for wf in wfs:
                q = wf.fit.quality
                lo = min(a for a, _ in wf.step_ranges)
                hi = max(b for _, b in wf.step_ranges)
                cells = [
                    "exact (transitions ≤ rank)" if _exact(wf)
                    else f"{_num(q.r2[i])} / {_num(q.loo_r2[i])} / {_sci(q.mse[i])}"
                    for i in range(m)
                ]  # fmt: skip
                out.append(
                    f"| {label} | {wf.index} | {lo}–{hi} | {len(wf.fit.observed)} | "
                    f"{_cond(wf.fit.condition)} | " + " | ".join(cells) + " |"
                )
        out += [
            "",
            "![Observed against fitted per-step loss changes (the fits that identify A)]"
            "(lmo_fit.png)",
            "",
            f"{h}# Fitted A per window",
            "",
            "A[i, j]: drop of domain i's loss per step per unit share of domain j in the "
            "mixture (positive: training on j lowers i's loss). (×10^e) after a heading: the "
            "entries shown times 10^e are A.",
        ]
        for label, wfs in fits:
            if all(wf.fit.rank < m for wf in wfs):
                # Only A p̄ is known: a matrix here would look like a finding and is not one.
                out += ["", f"**{label}**: A is not identified in any window (its mixtures "
                        f"span fewer than {m} dimensions); the minimum-norm A is in lmo.json."]  # fmt: skip
                continue
            for wf in wfs:
                table, e = matrix_table(wf.fit.A, doms)
                if wf.fit.rank < m:
                    unidentified = f", rank {wf.fit.rank} < {m}: not identified, minimum norm"
                elif wf.fit.condition > MAX_CONDITION:
                    unidentified = f", condition {_cond(wf.fit.condition)}: noise dominates"
                else:
                    unidentified = ""
                out += ["", f"**{label}, {_window_name(wf)}**{_scale_text(e)}{unidentified}",
                        "", table]  # fmt: skip
        if _identified_fits(res):
            out += ["", "![Fitted A of the fits whose mixtures determine it](lmo_A.png)"]
    out += ["", f"{h}# Static log-linear law", ""]
    if res.static is not None:
        s = res.static
        out += [
            f"Fitted on the last evaluation of {len(res.static_runs)} fixed-mixture runs: "
            f"{', '.join(res.static_runs)}.",
            "",
            "| domain | c | b | R² | leave-one-out R² | MSE |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i, d in enumerate(doms):
            q = s.quality
            out.append(
                f"| {d} | {_num(s.c[i])} | {_num(s.b[i])} | {_num(q.r2[i])} | "
                f"{_num(q.loo_r2[i])} | {_sci(q.mse[i])} |"
            )
        table, e = matrix_table(s.A, doms)
        out += ["", f"Centred A{_scale_text(e)}:", "", table, "",
                "![Observed against fitted final losses](lmo_static.png)"]  # fmt: skip
    else:
        out.append("Not fitted (see the notes).")
    out += ["", f"{h}# A method's A against the fitted A", ""]
    if res.distances:
        out += [
            "Scale-free: cosine of the matrices; relative error min_{s≥0} ‖sM − F‖/‖F‖ of the "
            "best rescaled method A; update cosine: cosine of the centred column sums Σ_i A_ij "
            "(the direction of the exponentiated-gradient step); off-diagonal share "
            "‖offdiag F‖/‖F‖ of the fitted A (what a diagonal A cannot express).",
            "",
            "| run | method's A | window | steps | compared with | cond of fit | cosine | "
            "rel. error | update cosine | off-diagonal share |",
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for x in res.distances:
            out.append(
                f"| {x.run} | {x.method} | {x.window} | {x.steps[0]}–{x.steps[1]} | "
                f"{x.reference} | {_cond(x.condition)} | {_num(x.d.cosine)} | "
                f"{_num(x.d.rel_error)} | "
                f"{_num(x.d.update_cosine)} | {_num(x.d.fitted_offdiag_share)} |"
            )
    else:
        out.append("No run logs a method A (DoReMi or Aioli) inside a fitted window.")
    if res.notes:
        out += ["", f"{h}# Notes", "", *[f"- {n}" for n in res.notes]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    return buf.getvalue()


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = min(cols, max(1, n))
    return (n + c - 1) // c, c


def _scatter(ax: Any, observed: np.ndarray, predicted: np.ndarray, domains: list[str],
             colors: dict[str, str]) -> None:  # fmt: skip
    for i, d in enumerate(domains):
        ax.scatter(observed[:, i], predicted[:, i], s=14, color=colors[d], label=d, alpha=0.85)
    lo = float(np.nanmin([observed.min(), predicted.min()]))
    hi = float(np.nanmax([observed.max(), predicted.max()]))
    ax.plot([lo, hi], [lo, hi], color="#444444", lw=0.8, ls="--")


def _images(res: LmoResult) -> dict[str, bytes]:
    from mixlab.report.plots import domain_colors

    doms = res.domains
    colors = domain_colors(doms)
    images: dict[str, bytes] = {}
    # A rank-deficient fit predicts its run's mean rate; scatter only the fits that identify A,
    # unless none does.
    drawn = _identified_fits(res)
    fits = drawn or res.fits()
    if fits:
        rows, cols = _grid(len(fits))
        fig = _figure(3.6 * cols, 3.2 * rows)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, (label, wfs) in zip(axes.ravel(), fits):
            obs = np.concatenate([wf.fit.observed for wf in wfs])
            pred = np.concatenate([wf.fit.predicted for wf in wfs])
            _scatter(ax, obs, pred, doms, colors)
            ax.set_title(f"{label}: mean R² {_num(_mean_r2(wfs))}", fontsize=9)
            ax.set_xlabel("observed ΔL per step", fontsize=8)
            ax.set_ylabel("law: −A p̄", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        for ax in axes.ravel()[len(fits):]:
            ax.set_visible(False)
        axes.ravel()[0].legend(fontsize=7, loc="upper left")
        fig.suptitle("Linear dynamic law: observed vs fitted loss changes", fontsize=10)
        images["lmo_fit.png"] = _png(fig)
        if drawn:
            images["lmo_A.png"] = _heatmaps(drawn, doms)
    if res.static is not None:
        s = res.static
        fig = _figure(4.2, 3.6)
        ax = fig.subplots()
        _scatter(ax, s.observed, s.predicted, doms, colors)
        ax.set_xlabel("observed final loss", fontsize=8)
        ax.set_ylabel("law: c + b exp(−A p)", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title("Static log-linear law across runs", fontsize=10)
        images["lmo_static.png"] = _png(fig)
    return images


def _identified_fits(res: LmoResult) -> list[tuple[str, list[WindowFit]]]:
    """The fits drawn: those whose mixtures determine A well (condition <= MAX_CONDITION) in at
    least one window. The minimum-norm A of a static run, or one from mixtures that barely
    move, says little about the domains and is left to the tables."""
    return [
        (label, wfs) for label, wfs in res.fits()
        if any(wf.fit.condition <= MAX_CONDITION for wf in wfs)
    ]  # fmt: skip


def _heatmaps(fits: list[tuple[str, list[WindowFit]]], domains: list[str]) -> bytes:
    """One row of heatmaps per fit, one panel per window; each row on its own symmetric colour
    scale (0 is white), values written in the cells up to 6 domains."""
    m = len(domains)
    cols = max(len(wfs) for _, wfs in fits)
    side = 1.0 + 0.45 * m
    fig = _figure(side * cols + (0.9 if m > 6 else 0.2), side * len(fits) + 0.4)
    axes = fig.subplots(len(fits), cols, squeeze=False)
    for row, (label, wfs) in zip(axes, fits):
        top = max(float(np.nanmax(np.abs(wf.fit.A))) for wf in wfs) or 1.0
        e = _display_exponent(np.array([top]))
        im = None
        for ax, wf in zip(row, wfs):
            im = ax.imshow(wf.fit.A, cmap="RdBu_r", vmin=-top, vmax=top)
            ax.set_xticks(range(m), domains, fontsize=7, rotation=45 if m > 3 else 0)
            ax.set_yticks(range(m), domains, fontsize=7)
            ax.set_title(f"{label}, {_window_name(wf)}" + (f", ×10^{e}" if e else ""),
                         fontsize=7)  # fmt: skip
            if m <= 6:
                for i in range(m):
                    for j in range(m):
                        v = wf.fit.A[i, j]
                        ax.text(j, i, f"{v / 10.0**e:.2f}", ha="center", va="center",
                                fontsize=6.5, color="white" if abs(v) > 0.6 * top else "black")  # fmt: skip
        for ax in row[len(wfs):]:
            ax.set_visible(False)
        if m > 6 and im is not None:
            fig.colorbar(im, ax=row.tolist(), shrink=0.8)
    fig.suptitle("Fitted A per window (rows: loss of; columns: share of)", fontsize=9)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# JSON


def _clean(x: Any) -> Any:
    """Arrays to lists, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _per_domain(values: np.ndarray, domains: list[str]) -> dict[str, float]:
    return dict(zip(domains, map(float, values)))


def _quality_json(q: Any, domains: list[str]) -> dict[str, Any]:
    return {k: _per_domain(getattr(q, k), domains) for k in ("mse", "r2", "loo_mse", "loo_r2")}


def _to_json(res: LmoResult) -> dict[str, Any]:
    doms = res.domains
    dynamic = []
    for label, wfs in res.fits():
        for wf in wfs:
            dynamic.append({
                "fit": label,
                "runs": [res.runs[i].label for i in wf.runs] if label == POOLED else [label],
                "window": wf.index,
                "step_ranges": wf.step_ranges,
                "transitions": len(wf.fit.observed),
                "rank": wf.fit.rank,
                "condition": wf.fit.condition,
                "A": wf.fit.A,
                "quality": _quality_json(wf.fit.quality, doms),
                "mixtures": wf.fit.mixtures,
                "observed": wf.fit.observed,
                "predicted": wf.fit.predicted,
            })  # fmt: skip
    static = None
    if res.static is not None:
        s = res.static
        static = {
            "runs": res.static_runs,
            "c": _per_domain(s.c, doms),
            "b": _per_domain(s.b, doms),
            "A": s.A,
            "quality": _quality_json(s.quality, doms),
            "mixtures": s.mixtures,
            "observed": s.observed,
            "predicted": s.predicted,
            "loo_predicted": s.loo_predicted,
        }
    runs = [
        {"label": r.label, "path": str(r.path), "mixer": r.mixer, "last_step": r.steps,
         "evaluations": len(r.eval_steps), "mixture_source": r.mixture_source,
         "constant_mixture": r.constant, "avg_mixture": _per_domain(r.avg_mixture, doms)}
        for r in res.runs
    ]  # fmt: skip
    distances = [
        {"run": x.run, "method": x.method, "window": x.window, "steps": x.steps,
         "compared_with": x.reference, "fit_condition": x.condition, "cosine": x.d.cosine,
         "rel_error": x.d.rel_error,
         "scale": x.d.scale, "update_cosine": x.d.update_cosine,
         "fitted_offdiag_share": x.d.fitted_offdiag_share, "method_A": x.method_A,
         "fitted_A": x.fitted_A}
        for x in res.distances
    ]  # fmt: skip
    return {
        "domains": doms,
        "window": res.window,
        "ridge": res.ridge,
        "runs": runs,
        "dynamic": dynamic,
        "static": static,
        "method_distance": distances,
        "notes": res.notes,
    }
