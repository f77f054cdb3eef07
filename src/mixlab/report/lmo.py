"""The LMO analysis of runs (``mixlab lmo``): its result, as Markdown and as JSON.

``mixlab.orchestrate.lmo_runs`` reads the runs and fits the mixing laws (``mixlab.lmo``) into an
``LmoResult``; ``lmo_markdown`` renders it as a report section (the plots it links are
``mixlab.report.lmo_plots.lmo_images``), ``lmo_json`` as ``lmo.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.lmo import ADistance, StaticFit, Transitions, WindowFit

POOLED = "pooled"
MAX_CONDITION = 100.0
"""Fits whose mixture matrix has a larger condition number are not drawn and are flagged: the
noise of the loss changes, amplified that much, dominates their A."""


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


def identified_fits(res: LmoResult) -> list[tuple[str, list[WindowFit]]]:
    """The fits drawn: those whose mixtures determine A well (condition <= MAX_CONDITION) in at
    least one window. The minimum-norm A of a static run, or one from mixtures that barely
    move, says little about the domains and is left to the tables."""
    return [
        (label, wfs) for label, wfs in res.fits()
        if any(wf.fit.condition <= MAX_CONDITION for wf in wfs)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Markdown


def is_exact(wf: WindowFit) -> bool:
    """No more transitions than the rank: the law interpolates them, R² = 1 says nothing."""
    return len(wf.fit.observed) <= wf.fit.rank


def mean_r2(wfs: list[WindowFit]) -> float:
    """Mean in-sample R² over the windows (not interpolated) and domains where it is defined."""
    kept = [wf.fit.quality.r2 for wf in wfs if not is_exact(wf)]
    r2 = np.concatenate(kept) if kept else np.zeros(0)
    return float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan")


def num(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals; "–" when not finite."""
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


def display_exponent(A: np.ndarray) -> int:
    """e such that A is shown as A / 10^e; 0 while the entries read well unscaled."""
    e = _exponent(A)
    return 0 if -1 <= e <= 1 else e


def matrix_table(A: np.ndarray, domains: list[str]) -> tuple[str, int]:
    """(Markdown table of A / 10^e, e): rows the loss of domain i, columns the share of
    domain j."""
    e = display_exponent(A)
    scaled = np.asarray(A) / 10.0**e
    rows = [
        "| loss of ↓ / share of → | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for i, d in enumerate(domains):
        rows.append(f"| {d} | " + " | ".join(num(float(v)) for v in scaled[i]) + " |")
    return "\n".join(rows), e


def _scale_text(e: int) -> str:
    return "" if e == 0 else f" (×10^{e})"


def window_name(wf: WindowFit) -> str:
    """'window k (steps lo–hi)' over every run the window covers."""
    lo = min(a for a, _ in wf.step_ranges)
    hi = max(b for _, b in wf.step_ranges)
    return f"window {wf.index} (steps {lo}–{hi})"


def lmo_markdown(res: LmoResult, level: int = 2) -> str:
    """The analysis as a report section whose headings start at ``level``; it links the images
    of ``lmo_images`` by their file names."""
    return _markdown(res, "#" * level)


def summary_lines(res: LmoResult) -> list[str]:
    """One line per fit: in how many windows A is determined, and the mean R² (what
    ``mixlab lmo`` prints)."""
    lines = []
    for label, fits in res.fits():
        good = sum(wf.fit.condition <= MAX_CONDITION for wf in fits)
        lines.append(f"{label}: A determined in {good} of {len(fits)} window(s); mean R² of the "
                     f"per-step loss change {num(mean_r2(fits))}")  # fmt: skip
    return lines


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
                    "exact (transitions ≤ rank)" if is_exact(wf)
                    else f"{num(q.r2[i])} / {num(q.loo_r2[i])} / {_sci(q.mse[i])}"
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
                out += ["", f"**{label}, {window_name(wf)}**{_scale_text(e)}{unidentified}",
                        "", table]  # fmt: skip
        if identified_fits(res):
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
                f"| {d} | {num(s.c[i])} | {num(s.b[i])} | {num(q.r2[i])} | "
                f"{num(q.loo_r2[i])} | {_sci(q.mse[i])} |"
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
                f"{x.reference} | {_cond(x.condition)} | {num(x.d.cosine)} | "
                f"{num(x.d.rel_error)} | "
                f"{num(x.d.update_cosine)} | {num(x.d.fitted_offdiag_share)} |"
            )
    else:
        out.append("No run logs a method A (DoReMi or Aioli) inside a fitted window.")
    if res.notes:
        out += ["", f"{h}# Notes", "", *[f"- {n}" for n in res.notes]]
    return "\n".join(out) + "\n"


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


def lmo_json(res: LmoResult) -> dict[str, Any]:
    """The analysis as JSON (``lmo.json``): arrays as lists, non-finite numbers as null."""
    return _clean(_to_json(res))
