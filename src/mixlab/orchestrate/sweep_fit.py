"""Choosing a mixture from finished proxy runs: the data mixing law, RegMix and the best run.

``choose(table, domains, method, objective, ...)`` fits every method that has enough runs
(``dml``: ``mixlab.offline.mixlaw``, needs N >= m + 2; ``regmix``: ``mixlab.offline.regmix``,
N >= 3; ``best``: the lowest observed objective) and returns their weights and fit quality as
JSON, with the ``--set`` lines that train on the chosen one. ``summary_text`` is what
``mixlab sweep`` prints of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixlab.errors import ConfigError, MixlabError

METHODS = ("dml", "regmix", "best")


@dataclass
class SweepTable:
    """The finished proxy runs' numbers (rows in sweep order)."""

    names: list[str]
    mixtures: np.ndarray
    """[R, m]"""
    val: np.ndarray
    """[R, m] per-domain validation loss (what the fits use)."""
    test: np.ndarray
    """[R, m] per-domain test loss (recorded, never used for the choice)."""
    target: np.ndarray | None
    """[R] validation loss on the target set, when the runs have one."""
    steps: int
    """Training steps of the finished proxy runs, extra steps included."""


# ---------------------------------------------------------------------------------------------
# Choosing the mixture


def objective_of(table: SweepTable, domains: list[str], objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(losses [R, k], weights [k]): the losses the objective is made of and their weights."""
    from mixlab.offline.mixlaw import objective_weights

    if objective == "target":
        if table.target is None:
            raise ConfigError("--objective target needs runs with a target set; set target.path "
                              "or target.domain in the config.")  # fmt: skip
        return table.target[:, None], np.ones(1)
    return table.val, objective_weights(domains, objective)


def choose(
    table: SweepTable,
    domains: list[str],
    method: str = "dml",
    objective: str = "avg",
    regressor: str = "gbr",
    floor: float = 0.0,
    prior: np.ndarray | None = None,
    seed: int = 0,
    candidates: int = 100_000,
) -> dict[str, Any]:
    """Every method's weights (those that have enough runs) and the chosen one's, as JSON."""
    from mixlab.offline.mixlaw import dml_mixture, project_floor
    from mixlab.offline.regmix import regmix_mixture
    from mixlab.offline.sweep import round_mixture

    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    R, m = table.mixtures.shape
    if R == 0:
        raise MixlabError("no proxy run has finished; nothing to fit.")
    if not 0.0 <= floor <= 1.0 / m:
        raise ConfigError(f"--floor must be in [0, 1/m] = [0, {1.0 / m:.4g}], got {floor}.")
    Y, w = objective_of(table, domains, objective)
    obj = Y @ w
    results: dict[str, Any] = {}
    notes: list[str] = []
    best = int(np.argmin(obj))
    results["best"] = {"weights": project_floor(table.mixtures[best], floor), "run": table.names[best],
                       "observed_objective": float(obj[best])}  # fmt: skip
    try:
        res = dml_mixture(table.mixtures, Y, objective=w, floor=floor)
        q = res.fit.quality
        results["dml"] = {
            "weights": res.weights, "predicted_objective": res.predicted_objective,
            "gap": res.gap, "nearest_run_l1": res.nearest_run_l1,
            "fit": {"r2": q.r2.tolist(), "loo_r2": q.loo_r2.tolist(), "mse": q.mse.tolist(),
                    "loo_mse": q.loo_mse.tolist(), "c": res.fit.c.tolist(),
                    "b": res.fit.b.tolist(), "A": res.fit.A.tolist()},
        }  # fmt: skip
    except ConfigError as exc:
        if method == "dml":
            raise
        notes.append(f"dml skipped: {exc}")
    try:
        rm = regmix_mixture(table.mixtures, obj, kind=regressor, prior=prior,
                            n_candidates=candidates, top_k=min(100, candidates), seed=seed)
        results["regmix"] = {
            "weights": project_floor(rm.weights, floor), "regressor": regressor,
            "predicted_objective": rm.predicted_objective, "top_k": rm.top_k,
            "n_candidates": rm.n_candidates,
            "fit": {"r2": rm.fit.r2, "cv_r2": rm.fit.cv_r2, "mse": rm.fit.mse, "cv_mse": rm.fit.cv_mse},
        }  # fmt: skip
    except ConfigError as exc:
        if method == "regmix":
            raise
        notes.append(f"regmix skipped: {exc}")
    for r in results.values():  # rounded to 6 decimals: readable --set lines, still sum to 1
        r["weights"] = dict(zip(domains, map(float, round_mixture(r["weights"]))))
    chosen = results[method]["weights"]
    return {
        "domains": domains, "objective": objective, "method": method, "weights": chosen,
        "runs": R, "extra_steps": table.steps, "methods": results, "notes": notes,
        "set": set_lines(chosen),
    }  # fmt: skip


def toml_table(weights: dict[str, float]) -> str:
    """``{a = 0.25, b = 0.75}``: an inline TOML table for ``--set``."""
    from mixlab.config import _inline

    return _inline(weights)


def set_lines(weights: dict[str, float]) -> dict[str, str]:
    """The ``--set`` arguments that train on ``weights``, as a fixed mixture or Aioli's prior."""
    t = toml_table(weights)
    return {
        "fixed": f"--set mixer.name=fixed --set 'mixer.options.weights={t}'",
        "aioli_prior": f"--set mixer.name=aioli --set 'mixer.options.prior={t}'",
    }


def summary_text(result: dict[str, Any]) -> str:
    """The methods' weights side by side, fit quality, and the --set lines of the chosen one."""
    doms = result["domains"]
    lines = [f"{result['runs']} proxy runs, {result['extra_steps']} steps; objective: "
             f"{result['objective']} validation loss", "",
             "method   " + "  ".join(f"{d:>10s}" for d in doms) + "  objective"]  # fmt: skip
    for name, r in result["methods"].items():
        value = r.get("predicted_objective", r.get("observed_objective"))
        kind = "observed" if name == "best" else "predicted"
        lines.append(f"{name:8s} " + "  ".join(f"{r['weights'][d]:10.4f}" for d in doms)
                     + f"  {value:.4f} ({kind})")  # fmt: skip
    if "dml" in result["methods"]:
        fit = result["methods"]["dml"]["fit"]
        lines.append("dml fit: R² " + ", ".join(f"{v:.3f}" for v in fit["r2"]) + "; leave-one-out R² "
                     + ", ".join(f"{v:.3f}" for v in fit["loo_r2"]))  # fmt: skip
    if "regmix" in result["methods"]:
        fit = result["methods"]["regmix"]["fit"]
        lines.append(f"regmix fit: R² {fit['r2']:.3f}; cross-validated R² {fit['cv_r2']:.3f}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines += ["", f"chosen ({result['method']}):", "  " + result["set"]["fixed"],
              "  " + result["set"]["aioli_prior"]]  # fmt: skip
    return "\n".join(lines)

