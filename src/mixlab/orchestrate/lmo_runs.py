"""Reading runs for the LMO mixing laws and fitting them (``mixlab lmo``, and the report's section).

Fits the LMO framework's mixing laws (``mixlab.lmo``) to what runs logged; the result
(``mixlab.report.lmo.LmoResult``) is rendered by ``mixlab.report.lmo`` and ``lmo_plots``.

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
- a method's own A, where its mixer class declares one (``Mixer.own_A``; likewise
  ``Mixer.loss_mixture`` declares DoReMi's α above): DoReMi's is diagonal, diag of the excess
  loss of its latest update (``mixer.excess``); Aioli's is its latest raw estimate (``mixer.A_raw``, in loss drop per
  probe of ``lp_steps`` steps; its normalised, smoothed ``mixer.A`` when no raw one is logged).
  Each is averaged over the train lines inside a window and compared, scale-free
  (``mixlab.lmo.compare_A``), with the A fitted on that run's window and on the pooled window.
- the static law uses the runs whose mixture never changed, at their last evaluation, among
  those with the most common number of steps (the law holds at one budget).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixlab.errors import ConfigError, MixlabError
from mixlab.lmo import StaticFit, WindowFit, compare_A, fit_dynamic, fit_static_law
from mixlab.report.lmo import (
    MAX_CONDITION,
    POOLED,
    Distance,
    LmoResult,
    RunData,
    is_exact,
    lmo_json,
    lmo_markdown,
)

if TYPE_CHECKING:
    from mixlab.mixers.base import Mixer


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


def _mixer_class(name: str) -> type[Mixer]:
    """The run's mixer class (what it declares: ``loss_mixture``, ``own_A``); the base class,
    which declares nothing, for a name no longer registered."""
    from mixlab.mixers.base import Mixer, mixer_class

    try:
        return mixer_class(name)
    except ConfigError:
        return Mixer


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
    cls = _mixer_class(mixer)
    loss_mix = cls.loss_mixture(options)
    if loss_mix and any(_mixer_entry(ln, loss_mix[0]) is not None for ln in lines):
        key, source = loss_mix
        lines = [ln for ln in lines if _mixer_entry(ln, key) is not None]
        mix = [ordered(_mixer_entry(ln, key)) for ln in lines]
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
    # The method's own A, as its mixer class declares it: the first report key the run logged.
    logged = [(k, d) for k, d in cls.own_A if any(_mixer_entry(ln, k) is not None for ln in lines)]
    if logged:
        key, method_source = logged[0]
        for ln in lines:
            if (value := _mixer_entry(ln, key)) is not None:
                A = ordered(value)
                method.append((ln["step"], np.diag(A) if A.ndim == 1 else A))
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
            ("exact", is_exact),
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


def lmo_section(
    run_dirs: list[str | Path], window: int = 0, ridge: float = 0.0, pool: bool = True,
    level: int = 2,
) -> tuple[str, dict[str, bytes]]:  # fmt: skip
    """The LMO analysis of ``run_dirs`` (run dirs or compare dirs) as a report section.

    Returns (Markdown starting with a heading of ``level``, {file name: PNG bytes}); the
    Markdown links the images by those file names, so write them next to it.
    """
    result = analyse(run_dirs, window=window, ridge=ridge, pool=pool)
    from mixlab.report.lmo_plots import lmo_images

    return lmo_markdown(result, level=level), lmo_images(result)


def write_analysis(res: LmoResult, out: str | Path) -> tuple[Path, Path, int]:
    """Write ``OUT/lmo.md``, ``OUT/lmo.json`` and the PNG plots; returns (md, json, plots)."""
    from mixlab.report.lmo_plots import lmo_images

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = lmo_images(res)
    for name, png in images.items():
        (out / name).write_bytes(png)
    md = f"# LMO: mixing laws fitted to {len(res.runs)} run(s)\n\n" + lmo_markdown(res, level=2)
    (out / "lmo.md").write_text(md, encoding="utf-8")
    (out / "lmo.json").write_text(json.dumps(lmo_json(res), indent=2) + "\n", encoding="utf-8")
    return out / "lmo.md", out / "lmo.json", len(images)
