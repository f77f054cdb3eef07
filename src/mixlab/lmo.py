"""The mixing laws of the LMO framework, fitted to what training runs logged (pure math, no I/O).

Chen, Hu, Lourie, Cho, Ré, "Aioli: A unified optimization framework for language model data
mixing", ICLR 2025 (arXiv 2411.05735). m domains, p ∈ simplex the training mixture, L_i the
eval loss of domain i.

**Linear dynamic mixing law.** One step on mixture p^t lowers the losses linearly in p::

    L_i^{t+1} = L_i^t - Σ_j A^t_ij p^t_j                                  (per optimizer step)

A run logs evaluations at steps s_0 < s_1 < ... < s_n, not every step. Over the interval
(s_k, s_{k+1}] with A constant the steps add up to L^{k+1} - L^k = -(s_{k+1} - s_k) A p̄^k,
where p̄^k is the *mean* mixture of the interval's steps (the law is linear in p, so the mean is
exact, not an approximation). So one transition gives, per domain i,

    d^k_i := (L^{k+1}_i - L^k_i) / (s_{k+1} - s_k) = -Σ_j A_ij p̄^k_j

and A is per optimizer step whatever the eval cadence. A window is W consecutive transitions of
a run (``window_slices``); A is fitted per window by least squares, every domain's row on its
own (row i only sees d_i): minimise Σ_k (d^k_i + A_i·p̄^k)² + λ ‖A_i‖², λ = ridge · tr(PᵀP) / m
(scale-free). ridge = 0 is plain least squares, minimum-norm when P is rank deficient. A run
on a fixed mixture has rank(P) = 1 and identifies only A p̄, not A; one whose mixture barely
moves has full rank but a large condition number, and noise dominates its A. Pooling runs with
different mixtures (their windows stacked, ``fit_dynamic``) is what conditions the fit; every
fit reports its rank and condition number.

**Static log-linear law.** Runs trained to the same budget on fixed mixtures p^r::

    L_i(p) = c_i + b_i exp(-Σ_j A_ij p_j)

On the simplex Σ_j p_j = 1, so adding k to every A_ij and multiplying b_i by e^k changes
nothing: only the *centred* A (every row sums to 0) and the matching b are identified, and
those are what ``fit_static_law`` returns. Fitted per domain with scipy's bounded least squares
(c_i in [0, min observed L_i], |A_ij| <= ``a_bound``), started from linear fits of
log(L_i - c) for a grid of c.

**Comparing a method's A with the fitted A.** A method fixes A only up to its own scale
(DoReMi's excess losses, Aioli's normalisation, per-step vs per-probe units), so
``compare_A`` is scale-free: the cosine of the two matrices as vectors, and the relative error
of the best non-negative rescaling of the method's A, min_{s>=0} ‖s M - F‖_F / ‖F‖_F (0 iff
M = s F with s > 0; sqrt(1 - cos²) when cos > 0, else 1). It also compares what moves the
mixture: the exponentiated-gradient step p_j ∝ p_j exp(η Σ_i A_ij) depends only on the column
sums of A up to a constant, so the cosine of the centred column sums is the agreement in
*direction of the update*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Leverage above this makes a leave-one-out residual undefined (the point fits itself exactly).
_LEVERAGE_MAX = 1.0 - 1e-9


# ---------------------------------------------------------------------------------------------
# Fit quality


def mse_r2(observed: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column MSE and R² of predictions; inputs [n, m], outputs [m] each.

    R² = 1 - Σ (y - ŷ)² / Σ (y - ȳ)² (may be negative); NaN for a constant column, where it is
    undefined, and for a column with a NaN prediction (an undefined leave-one-out residual).
    """
    y = np.asarray(observed, dtype=np.float64)
    yhat = np.asarray(predicted, dtype=np.float64)
    res = ((y - yhat) ** 2).sum(axis=0)
    tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    n = y.shape[0]
    mse = res / max(1, n)
    # A column constant up to rounding has no variance to explain.
    floor = n * (1e-12 * np.abs(y).max(axis=0, initial=0.0)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tot > floor, 1.0 - res / tot, np.nan)
    return mse, r2


@dataclass
class FitQuality:
    """In-sample and leave-one-out fit quality, one value per domain ([m] each)."""

    mse: np.ndarray
    r2: np.ndarray
    loo_mse: np.ndarray
    """MSE of leave-one-out predictions (each observation predicted by a fit without it);
    NaN where some observation cannot be left out (it alone determines a parameter)."""
    loo_r2: np.ndarray

    @classmethod
    def of(cls, observed: np.ndarray, predicted: np.ndarray, loo_predicted: np.ndarray) -> FitQuality:
        mse, r2 = mse_r2(observed, predicted)
        loo_mse, loo_r2 = mse_r2(observed, loo_predicted)
        return cls(mse=mse, r2=r2, loo_mse=loo_mse, loo_r2=loo_r2)


# ---------------------------------------------------------------------------------------------
# Linear dynamic law


def interval_mixtures(
    eval_steps: np.ndarray, mix_steps: np.ndarray, mixtures: np.ndarray
) -> np.ndarray:
    """[n, m] mean mixture of each interval between consecutive evaluations.

    ``eval_steps`` [n + 1] increasing; ``mix_steps`` [T] the steps of mixture snapshots
    ``mixtures`` [T, m] (a snapshot at step s is the mixture of the step that ended at s).
    Interval k covers steps (eval_steps[k], eval_steps[k + 1]]; its row is the mean of the
    snapshots inside it, NaN when none is. With a snapshot every step this is the exact mean.
    """
    e = np.asarray(eval_steps)
    s = np.asarray(mix_steps)
    w = np.asarray(mixtures, dtype=np.float64).reshape(len(s), -1)
    out = np.full((max(0, len(e) - 1), w.shape[1]), np.nan)
    for k in range(len(e) - 1):
        inside = (s > e[k]) & (s <= e[k + 1])
        if inside.any():
            out[k] = w[inside].mean(axis=0)
    return out


def loss_rates(eval_steps: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """[n, m] per-step loss change between consecutive evaluations, (L^{k+1} - L^k) / Δs.

    ``eval_steps`` [n + 1] strictly increasing, ``losses`` [n + 1, m].
    """
    s = np.asarray(eval_steps, dtype=np.float64)
    L = np.asarray(losses, dtype=np.float64)
    ds = np.diff(s)
    if np.any(ds <= 0):
        raise ValueError("evaluation steps must be strictly increasing.")
    return np.diff(L, axis=0) / ds[:, None]


def window_slices(n: int, window: int) -> list[slice]:
    """Windows of ``window`` consecutive transitions out of n; 0 = one window of all n.

    The remainder joins the last window (so windows hold window .. 2*window - 1 transitions),
    never a short window of its own that could not be fitted.
    """
    if window <= 0 or n <= window:
        return [slice(0, n)] if n > 0 else []
    starts = list(range(0, n - n % window, window))
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], n])]


@dataclass
class LinearFit:
    """The linear dynamic law fitted on one window (one run, or several pooled)."""

    A: np.ndarray
    """[m, m] per-step A: A[i, j] is the drop of domain i's loss per step per unit of domain j."""
    mixtures: np.ndarray
    """[n, m] the transitions' mean mixtures p̄^k."""
    observed: np.ndarray
    """[n, m] observed per-step loss changes d^k."""
    predicted: np.ndarray
    """[n, m] the law's -A p̄^k."""
    loo_predicted: np.ndarray
    """[n, m] leave-one-out predictions (NaN where a transition has leverage 1)."""
    quality: FitQuality
    rank: int
    """Numerical rank of the mixture matrix P; below m, A is identified only on span(P)."""
    condition: float
    """Condition number of P (largest over smallest singular value; inf when rank < m): noise
    in the loss changes reaches A amplified by up to this factor, so a fit from mixtures that
    barely move (condition in the hundreds or more) is mostly noise even at full rank."""
    ridge: float


def fit_linear_law(mixtures: np.ndarray, rates: np.ndarray, ridge: float = 0.0) -> LinearFit:
    """Fit d^k = -A p̄^k by (ridge) least squares; ``mixtures`` and ``rates`` [n, m], n >= 1.

    Leave-one-out predictions are exact for a fixed λ: e_k / (1 - h_kk) with h the diagonal of
    the hat matrix P (PᵀP + λI)⁺ Pᵀ, so they cost nothing beyond the fit. With n < m (fewer
    transitions than domains) the SVD has n values: rank <= n, condition inf.
    """
    P = np.asarray(mixtures, dtype=np.float64)
    D = np.asarray(rates, dtype=np.float64)
    if P.ndim != 2 or P.shape != D.shape or P.shape[0] == 0:
        raise ValueError(f"mixtures {P.shape} and rates {D.shape} must both be [n >= 1, m].")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    m = P.shape[1]
    # Through the SVD of P, not PᵀP, so the condition number is not squared. With
    # P = U S Vᵀ: coef = V diag(f) Uᵀ D, f = s / (s² + λ), which for λ = 0 is 1/s on the
    # numerically non-zero singular values and 0 elsewhere (the minimum-norm solution).
    U, sv, Vt = np.linalg.svd(P, full_matrices=False)  # U [n, k], sv [k], Vt [k, m]
    cutoff = sv.max() * max(P.shape) * np.finfo(np.float64).eps
    rank = int((sv > cutoff).sum())
    lam = ridge * float((sv**2).sum()) / m  # tr(PᵀP) = Σ s²
    if lam > 0:
        f = sv / (sv**2 + lam)
    else:
        f = np.where(sv > cutoff, 1.0 / np.where(sv > cutoff, sv, 1.0), 0.0)
    coef = Vt.T @ (f[:, None] * (U.T @ D))  # [m, m]: column i holds -A[i, :]
    A = -coef.T
    predicted = P @ coef
    lev = (U**2 * (sv * f)[None, :]).sum(axis=1)  # diagonal of the hat matrix U diag(s f) Uᵀ
    resid = D - predicted
    with np.errstate(divide="ignore", invalid="ignore"):
        loo_resid = np.where((lev < _LEVERAGE_MAX)[:, None], resid / (1.0 - lev)[:, None], np.nan)
    loo_predicted = D - loo_resid
    condition = float(sv[0] / sv[-1]) if rank == m else float("inf")
    return LinearFit(
        A=A,
        mixtures=P,
        observed=D,
        predicted=predicted,
        loo_predicted=loo_predicted,
        quality=FitQuality.of(D, predicted, loo_predicted),
        rank=rank,
        condition=condition,
        ridge=ridge,
    )


@dataclass
class Transitions:
    """One run's dynamic-law data: the mean mixture and per-step loss change of each interval
    between consecutive evaluations, and the step range of each."""

    mixtures: np.ndarray
    """[n, m] mean mixture p̄^k of interval k."""
    rates: np.ndarray
    """[n, m] per-step loss change d^k."""
    steps: np.ndarray
    """[n, 2] (s_k, s_{k+1}) of interval k."""

    @classmethod
    def from_log(
        cls,
        eval_steps: np.ndarray,
        eval_losses: np.ndarray,
        mix_steps: np.ndarray,
        mixtures: np.ndarray,
    ) -> Transitions:
        """From evaluations (``eval_steps`` [E], ``eval_losses`` [E, m]) and mixture snapshots
        (``mix_steps`` [T], ``mixtures`` [T, m]). Intervals with no snapshot or a non-finite
        loss are dropped."""
        e = np.asarray(eval_steps)
        losses = np.asarray(eval_losses, dtype=np.float64)
        m = losses.shape[1] if losses.ndim == 2 else np.asarray(mixtures).shape[-1]
        if len(e) < 2:
            return cls(np.zeros((0, m)), np.zeros((0, m)), np.zeros((0, 2), dtype=np.int64))
        P = interval_mixtures(e, mix_steps, mixtures)
        D = loss_rates(e, losses)
        ok = np.all(np.isfinite(P), axis=1) & np.all(np.isfinite(D), axis=1)
        steps = np.stack([e[:-1], e[1:]], axis=1).astype(np.int64)
        return cls(P[ok], D[ok], steps[ok])

    def __len__(self) -> int:
        return len(self.rates)


@dataclass
class WindowFit:
    """The law fitted on window ``index`` of each of the runs it pools."""

    index: int
    runs: list[int]
    """Indices (into the list given to ``fit_dynamic``) of the runs with data in this window."""
    step_ranges: list[tuple[int, int]]
    """Per pooled run, the steps (first eval, last eval) the window spans."""
    fit: LinearFit


def fit_dynamic(runs: list[Transitions], window: int = 0, ridge: float = 0.0) -> list[WindowFit]:
    """Fit A per window; with several runs, window w stacks window w of every run.

    Windows are counted in transitions of each run (``window_slices``), so runs pooled this way
    should share their eval schedule (``step_ranges`` says what each window covered). A window
    is skipped when it holds no transition.
    """
    per_run = [window_slices(len(r), window) for r in runs]
    out = []
    for w in range(max((len(s) for s in per_run), default=0)):
        idx = [i for i, s in enumerate(per_run) if w < len(s)]
        if not idx:
            continue
        P = np.concatenate([runs[i].mixtures[per_run[i][w]] for i in idx])
        D = np.concatenate([runs[i].rates[per_run[i][w]] for i in idx])
        ranges = []
        for i in idx:
            st = runs[i].steps[per_run[i][w]]
            ranges.append((int(st[0, 0]), int(st[-1, 1])))
        out.append(WindowFit(index=w, runs=idx, step_ranges=ranges, fit=fit_linear_law(P, D, ridge)))
    return out


def simulate_linear_law(
    L0: np.ndarray, A: np.ndarray | list[np.ndarray], mixtures: np.ndarray
) -> np.ndarray:
    """[T + 1, m] losses of T steps of the exact law from ``L0`` [m] on ``mixtures`` [T, m].

    ``A`` is one [m, m] matrix or one per step (the law's A^t). For tests and examples.
    """
    P = np.asarray(mixtures, dtype=np.float64)
    As = [np.asarray(A, dtype=np.float64)] * len(P) if np.ndim(A) == 2 else list(A)
    L = [np.asarray(L0, dtype=np.float64)]
    for p, At in zip(P, As):
        L.append(L[-1] - At @ p)
    return np.stack(L)


# ---------------------------------------------------------------------------------------------
# Static log-linear law


def static_law(mixtures: np.ndarray, c: np.ndarray, b: np.ndarray, A: np.ndarray) -> np.ndarray:
    """[R, m] losses L_i(p) = c_i + b_i exp(-Σ_j A_ij p_j) for ``mixtures`` [R, m]."""
    P = np.asarray(mixtures, dtype=np.float64)
    return np.asarray(c)[None, :] + np.asarray(b)[None, :] * np.exp(-P @ np.asarray(A).T)


def centre_static(b: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The identified form (b̃, Ã) of (b [m], A [m, m]): rows of Ã sum to 0, same law on the
    simplex (b̃_i = b_i exp(-mean_j A_ij))."""
    A = np.asarray(A, dtype=np.float64)
    mean = A.mean(axis=1)
    return np.asarray(b, dtype=np.float64) * np.exp(-mean), A - mean[:, None]


@dataclass
class StaticFit:
    """The static log-linear law fitted across runs, in the centred gauge."""

    c: np.ndarray
    """[m] irreducible loss c_i."""
    b: np.ndarray
    """[m] b_i of the centred form."""
    A: np.ndarray
    """[m, m] centred A (every row sums to 0)."""
    mixtures: np.ndarray
    """[R, m] the runs' mixtures."""
    observed: np.ndarray
    """[R, m] the runs' losses."""
    predicted: np.ndarray
    """[R, m] the law's losses."""
    loo_predicted: np.ndarray
    """[R, m] each run's losses predicted by the law fitted without it."""
    quality: FitQuality


def _fit_static_domain(
    P: np.ndarray, y: np.ndarray, a_bound: float, start: np.ndarray | None = None
) -> np.ndarray:
    """Parameters (c, log b, a_1..a_{m-1}) of one domain in the gauge a_m = 0.

    ``P`` [R, m], ``y`` [R]. Bounded least squares (analytic Jacobian) from several starts: for
    c on a grid below min y, log(y - c) = log b - Σ_{j<m} a_j p_j is linear, and its solution is
    a start. ``start`` replaces the grid (a warm start for leave-one-out refits).
    """
    # Imported here: scipy.optimize takes about half a second to load, and `mixlab --help`
    # imports every command module (this one through `mixlab lmo`).
    from scipy.optimize import least_squares

    m = P.shape[1]
    Q = P[:, : m - 1]
    X = np.concatenate([np.ones((len(P), 1)), -Q], axis=1)
    y_min = float(y.min())
    c_hi = y_min * (1.0 - 1e-9) if y_min > 0 else 1e-12
    lo = np.array([0.0, -50.0, *([-a_bound] * (m - 1))])
    hi = np.array([c_hi, 50.0, *([a_bound] * (m - 1))])

    def residual(theta: np.ndarray) -> np.ndarray:
        return theta[0] + np.exp(theta[1] - Q @ theta[2:]) - y

    def jacobian(theta: np.ndarray) -> np.ndarray:
        e = np.exp(theta[1] - Q @ theta[2:])
        return np.concatenate([np.ones((len(y), 1)), e[:, None], -Q * e[:, None]], axis=1)

    if start is not None:
        starts = [start]
    else:
        starts = []
        for frac in (0.0, 0.5, 0.8, 0.9, 0.95, 0.99):
            c0 = frac * max(y_min, 0.0)
            lin = np.linalg.lstsq(X, np.log(np.maximum(y - c0, 1e-12)), rcond=None)[0]
            starts.append(np.concatenate([[c0], lin]))
    best, best_cost = starts[0], np.inf
    margin = 1e-9 * (hi - lo)  # least_squares wants starts strictly inside the bounds
    for x0 in starts:
        x0 = np.clip(x0, lo + margin, hi - margin)
        res = least_squares(residual, x0, jac=jacobian, bounds=(lo, hi), method="trf",
                            x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12)  # fmt: skip
        if res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _static_params(theta: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(c, b, A row [m]) of the gauge a_m = 0 from the optimiser's parameters."""
    return float(theta[0]), float(np.exp(theta[1])), np.concatenate([theta[2:], [0.0]])


def fit_static_law(mixtures: np.ndarray, losses: np.ndarray, a_bound: float = 50.0) -> StaticFit:
    """Fit L_i(p) = c_i + b_i exp(-Σ_j A_ij p_j) per domain across R runs.

    ``mixtures`` [R, m] (each row a mixture; renormalised to sum 1), ``losses`` [R, m] (each
    run's loss per domain at the same budget). Needs R >= m + 2: the centred law has m + 1
    parameters per domain. Leave-one-out refits the law R times without each run.
    """
    P = np.asarray(mixtures, dtype=np.float64)
    Y = np.asarray(losses, dtype=np.float64)
    if P.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"mixtures {P.shape} and losses {Y.shape} must both be [R, m].")
    n_runs, m = P.shape
    if n_runs < m + 2:
        raise ValueError(f"the static law has {m + 1} parameters per domain; it needs at least "
                         f"{m + 2} runs, got {n_runs}.")  # fmt: skip
    P = P / P.sum(axis=1, keepdims=True)
    c, b, A = np.zeros(m), np.zeros(m), np.zeros((m, m))
    thetas = []
    for i in range(m):
        thetas.append(_fit_static_domain(P, Y[:, i], a_bound))
        c[i], b[i], A[i] = _static_params(thetas[i])
    b, A = centre_static(b, A)
    predicted = static_law(P, c, b, A)
    loo = np.zeros_like(Y)
    for r in range(n_runs):
        keep = np.arange(n_runs) != r
        for i in range(m):
            theta = _fit_static_domain(P[keep], Y[keep, i], a_bound, start=thetas[i])
            ci, bi, Ai = _static_params(theta)
            loo[r, i] = ci + bi * np.exp(-P[r] @ Ai)
    return StaticFit(
        c=c, b=b, A=A, mixtures=P, observed=Y, predicted=predicted, loo_predicted=loo,
        quality=FitQuality.of(Y, predicted, loo),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A method's A against the fitted one


@dataclass
class ADistance:
    """How close a method's A (M) is to a fitted A (F), independent of M's scale."""

    cosine: float
    """⟨M, F⟩_F / (‖M‖_F ‖F‖_F), in [-1, 1]; NaN when either is 0."""
    rel_error: float
    """min_{s >= 0} ‖s M - F‖_F / ‖F‖_F, in [0, 1]."""
    scale: float
    """The minimising s (what M must be multiplied by to best match F's units)."""
    update_cosine: float
    """Cosine of the centred column sums Σ_i A_ij: agreement on the exponentiated-gradient
    direction; NaN when either update is 0 (every column sum equal)."""
    fitted_offdiag_share: float
    """‖offdiag(F)‖_F / ‖F‖_F: how much of the fitted A a diagonal A (DoReMi) cannot express."""


def _cos(x: np.ndarray, y: np.ndarray, zero_x: float = 0.0, zero_y: float = 0.0) -> float:
    """Cosine of x and y as vectors; NaN when ‖x‖ <= zero_x or ‖y‖ <= zero_y."""
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx <= zero_x or ny <= zero_y:
        return float("nan")
    return float(np.clip(np.dot(x.ravel(), y.ravel()) / (nx * ny), -1.0, 1.0))


def compare_A(method: np.ndarray, fitted: np.ndarray) -> ADistance:
    """Scale-free distance between a method's A ``method`` [m, m] and ``fitted`` [m, m]."""
    M = np.asarray(method, dtype=np.float64)
    F = np.asarray(fitted, dtype=np.float64)
    if M.shape != F.shape or M.ndim != 2:
        raise ValueError(f"A matrices must have the same [m, m] shape, got {M.shape}, {F.shape}.")
    nF = float(np.linalg.norm(F))
    cos = _cos(M, F)
    mm = float(np.sum(M * M))
    scale = max(0.0, float(np.sum(M * F)) / mm) if mm > 0 else 0.0
    rel = float(np.linalg.norm(scale * M - F) / nF) if nF > 0 else float("nan")
    uM, uF = M.sum(axis=0), F.sum(axis=0)
    off = F - np.diag(np.diag(F))
    # Column sums equal up to rounding mean no update direction: judged relative to each
    # matrix's own norm, so the comparison stays independent of the two scales.
    tol = 1e-12 * np.sqrt(M.shape[0])
    return ADistance(
        cosine=cos,
        rel_error=rel,
        scale=scale,
        update_cosine=_cos(uM - uM.mean(), uF - uF.mean(), tol * np.sqrt(mm), tol * nF),
        fitted_offdiag_share=float(np.linalg.norm(off) / nF) if nF > 0 else float("nan"),
    )
