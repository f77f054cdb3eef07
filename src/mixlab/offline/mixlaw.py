"""Data mixing law (DML): fit the static log-linear law to a sweep and solve for the best mixture.

Ye et al., "Data Mixing Laws" (arXiv 2403.16952), in the form the LMO framework uses
(``mixlab.lmo``). R runs trained to the same budget on fixed mixtures p^r ∈ simplex, each
with its per-domain validation losses L^r ∈ R^m, give per domain i::

    L_i(p) = c_i + b_i exp(-Σ_j A_ij p_j)

fitted by ``mixlab.lmo.fit_static_law`` (bounded least squares per domain, the centred gauge:
rows of A sum to 0, which loses nothing on the simplex; fit quality in-sample and leave-one-out).

**Objective.** A weight vector w over domains (``objective_weights``): uniform for the average
loss, one-hot for one target domain, or any non-negative weights. The mixture minimises

    f(p) = Σ_i w_i L_i(p)        subject to p_j >= floor, Σ_j p_j = 1.

b_i = exp(·) > 0 and w_i >= 0, so f is a non-negative sum of exponentials of affine functions:
convex, and every local minimum on the (convex) feasible set is global. ``solve_simplex`` runs
SLSQP with the analytic gradient ∇f = -Aᵀ (w ∘ b ∘ exp(-A p)) from the centre and from every
vertex, keeps the best, and reports the Frank-Wolfe gap g·p - min_k g·v_k over the vertices v_k
of the feasible set (g = ∇f(p)): for a convex f it bounds f(p) - f* from above, so a gap near 0
certifies the optimum.

**Extrapolation.** The law is fitted where the sweep sampled; its optimum may lie far from every
sampled mixture, where nothing checks it. ``DMLResult.nearest_run_l1`` says how far (L1) the
optimum is from the closest sampled mixture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixlab.errors import ConfigError
from mixlab.lmo import (
    FitQuality,
    StaticFit,
    _fit_static_domain,
    _static_params,
    centre_static,
    fit_static_law,
    static_law,
)


def objective_weights(domains: Sequence[str], target: str | Mapping[str, float] = "avg") -> np.ndarray:
    """[m] non-negative weights summing to 1 that define the objective Σ_i w_i L_i.

    ``"avg"`` = uniform (the average loss); a domain name = that domain only; a mapping
    ``{domain: weight}`` = those weights (domains left out get 0), normalised.
    """
    m = len(domains)
    if m == 0:
        raise ConfigError("no domains to build an objective over.")
    if isinstance(target, str):
        if target == "avg":
            return np.full(m, 1.0 / m)
        if target not in domains:
            raise ConfigError(
                f"objective target '{target}' is neither 'avg' nor a domain; domains are "
                f"{list(domains)}."
            )
        w = np.zeros(m)
        w[list(domains).index(target)] = 1.0
        return w
    unknown = sorted(set(target) - set(domains))
    if unknown:
        raise ConfigError(f"objective weights name unknown domain(s) {unknown}; domains are {list(domains)}.")
    w = np.array([float(target.get(d, 0.0)) for d in domains])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"objective weights must be finite, >= 0 and not all 0, got {dict(target)}.")
    return w / w.sum()


def law_objective(p: np.ndarray, c: np.ndarray, b: np.ndarray, A: np.ndarray, w: np.ndarray) -> float:
    """f(p) = Σ_i w_i (c_i + b_i exp(-A_i·p)) for one mixture ``p`` [m]."""
    return float(static_law(np.asarray(p)[None, :], c, b, A)[0] @ w)


def law_gradient(p: np.ndarray, b: np.ndarray, A: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[m] ∇f(p) = -Aᵀ (w ∘ b ∘ exp(-A p)) (c does not enter)."""
    A = np.asarray(A, dtype=np.float64)
    return -A.T @ (np.asarray(w) * np.asarray(b) * np.exp(-A @ np.asarray(p, dtype=np.float64)))


def feasible_vertices(m: int, floor: float) -> np.ndarray:
    """[m, m] vertices of {p >= floor, Σ p = 1}: row k = floor + (1 - m·floor) e_k."""
    return np.full((m, m), floor) + (1.0 - m * floor) * np.eye(m)


def project_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """``p`` [m] clipped to >= floor and renormalised (exactly on the simplex up to rounding)."""
    q = np.maximum(np.asarray(p, dtype=np.float64), floor)
    return q / q.sum()


@dataclass
class SimplexSolution:
    """The minimiser of a law's objective on the (floored) simplex."""

    weights: np.ndarray
    """[m] the mixture: >= floor, sums to 1."""
    value: float
    """f(weights)."""
    gap: float
    """Frank-Wolfe gap at ``weights``: an upper bound on value - f* (0 at the optimum)."""


def solve_simplex(
    c: np.ndarray, b: np.ndarray, A: np.ndarray, w: np.ndarray, floor: float = 0.0
) -> SimplexSolution:
    """Minimise Σ_i w_i (c_i + b_i exp(-A_i·p)) over {p >= floor, Σ p = 1}.

    ``c``, ``b``, ``w`` [k] (b > 0, w >= 0 make the problem convex), ``A`` [k, m]: k laws (one
    per domain, or one for a target set) over m mixture weights. Any gauge of A works (adding a
    constant to a row only rescales b on the simplex).
    """
    from scipy.optimize import minimize  # ~0.5 s to import: only when solving

    c, b, w = (np.asarray(x, dtype=np.float64) for x in (c, b, w))
    A = np.asarray(A, dtype=np.float64)
    k = c.size
    m = A.shape[1] if A.ndim == 2 else 0
    if A.shape != (k, m) or m == 0 or b.shape != (k,) or w.shape != (k,):
        raise ValueError(f"c {c.shape}, b {b.shape}, w {w.shape} must be [k], A {A.shape} [k, m].")
    if not 0.0 <= floor <= 1.0 / m:
        raise ConfigError(f"floor must be in [0, 1/m] = [0, {1.0 / m:.4g}], got {floor}.")
    verts = feasible_vertices(m, floor)

    def f(p: np.ndarray) -> float:
        return float(w @ (b * np.exp(-A @ p)))  # c is a constant: left out while optimising

    def grad(p: np.ndarray) -> np.ndarray:
        return law_gradient(p, b, A, w)

    starts = [np.full(m, 1.0 / m), *(0.5 * v + 0.5 / m for v in verts)]
    best, best_val = starts[0], np.inf
    for x0 in starts:
        res = minimize(
            f, x0, jac=grad, method="SLSQP", bounds=[(floor, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0,
                          "jac": lambda p: np.ones_like(p)}],
            options={"ftol": 1e-15, "maxiter": 500},
        )  # fmt: skip
        p = project_floor(res.x, floor)
        val = f(p)
        if val < best_val:
            best, best_val = p, val
    # Vertices themselves are candidates too (the optimum is often a face of the simplex).
    for v in verts:
        if f(v) < best_val:
            best, best_val = v.copy(), f(v)
    g = grad(best)
    gap = float(g @ best - (verts @ g).min())
    return SimplexSolution(weights=best, value=best_val + float(w @ c), gap=max(gap, 0.0))


def fit_law(mixtures: np.ndarray, losses: np.ndarray, a_bound: float = 50.0) -> StaticFit:
    """The static law fitted to ``losses`` [R, k] of runs on ``mixtures`` [R, m], one law per
    column: the m domains (``mixlab.lmo.fit_static_law``) or any other k columns, e.g. k = 1 for
    a target set's loss (lmo's per-domain fit applied to each column). A is [k, m], centred."""
    P = np.asarray(mixtures, dtype=np.float64)
    Y = np.asarray(losses, dtype=np.float64)
    if P.ndim != 2 or Y.ndim != 2 or P.shape[0] != Y.shape[0]:
        raise ConfigError(f"mixtures {P.shape} and losses {Y.shape} must be [runs, m] and [runs, k].")
    n_runs, m = P.shape
    if n_runs < m + 2:
        raise ConfigError(
            f"the mixing law has {m + 1} parameters per loss, so fitting it over {m} domains needs "
            f"at least {m + 2} runs; the sweep has {n_runs}. Run a larger sweep (--n {m + 2} or more)."
        )
    if not np.all(np.isfinite(Y)):
        raise ConfigError("some sweep losses are NaN or infinite; rerun or drop those runs.")
    if Y.shape[1] == m:
        return fit_static_law(P, Y, a_bound=a_bound)
    P = P / P.sum(axis=1, keepdims=True)
    k = Y.shape[1]
    c, b, A = np.zeros(k), np.zeros(k), np.zeros((k, m))
    thetas = [_fit_static_domain(P, Y[:, i], a_bound) for i in range(k)]
    for i, theta in enumerate(thetas):
        c[i], b[i], A[i] = _static_params(theta)
    b, A = centre_static(b, A)
    loo = np.zeros_like(Y)
    for r in range(n_runs):
        keep = np.arange(n_runs) != r
        for i in range(k):
            ci, bi, Ai = _static_params(_fit_static_domain(P[keep], Y[keep, i], a_bound, thetas[i]))
            loo[r, i] = ci + bi * np.exp(-P[r] @ Ai)
    predicted = static_law(P, c, b, A)
    return StaticFit(c=c, b=b, A=A, mixtures=P, observed=Y, predicted=predicted,
                     loo_predicted=loo, quality=FitQuality.of(Y, predicted, loo))  # fmt: skip


@dataclass
class DMLResult:
    """A fitted law and the mixture it recommends."""

    fit: StaticFit
    """The laws (c, b, centred A) with their fit quality (in-sample and leave-one-out)."""
    objective: np.ndarray
    """[k] the objective's weights over the fitted losses."""
    weights: np.ndarray
    """[m] the recommended mixture (a distribution)."""
    predicted_losses: np.ndarray
    """[k] the laws' losses at ``weights``."""
    predicted_objective: float
    """Σ_i w_i predicted_losses_i."""
    gap: float
    """Frank-Wolfe gap of the solution (see ``solve_simplex``)."""
    best_run: int
    """Index of the sampled run with the lowest observed objective."""
    nearest_run_l1: float
    """L1 distance from ``weights`` to the closest sampled mixture (large = extrapolation)."""


def dml_mixture(
    mixtures: np.ndarray,
    losses: np.ndarray,
    objective: np.ndarray | None = None,
    floor: float = 0.0,
    a_bound: float = 50.0,
) -> DMLResult:
    """Fit the law to R runs and minimise the objective on the simplex.

    ``mixtures`` [R, m]; ``losses`` [R, k]: per-domain losses (k = m) or any other losses the
    runs measured (k = 1: a target set); ``objective`` [k] weights over them (default uniform:
    the average loss). Needs R >= m + 2 runs (the centred law has m + 1 parameters per loss);
    fewer is a ``ConfigError``.
    """
    fit = fit_law(mixtures, losses, a_bound=a_bound)
    k = fit.observed.shape[1]
    w = np.full(k, 1.0 / k) if objective is None else np.asarray(objective, dtype=np.float64)
    if w.shape != (k,):
        raise ConfigError(f"objective has {w.size} weights for {k} fitted losses.")
    sol = solve_simplex(fit.c, fit.b, fit.A, w, floor=floor)
    pred = static_law(sol.weights[None, :], fit.c, fit.b, fit.A)[0]
    return DMLResult(
        fit=fit,
        objective=w,
        weights=sol.weights,
        predicted_losses=pred,
        predicted_objective=float(pred @ w),
        gap=sol.gap,
        best_run=int(np.argmin(fit.observed @ w)),
        nearest_run_l1=float(np.abs(fit.mixtures - sol.weights[None, :]).sum(axis=1).min()),
    )
