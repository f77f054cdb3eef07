"""RegMix-style mixture search: regress the objective on the mixture, pick the predicted best.

Liu et al., "RegMix: Data Mixture as Regression for Language Model Pre-training"
(arXiv 2407.01492). R proxy runs on mixtures p^r with objective values y^r (e.g. the average
validation loss) train a regressor ŷ(p); then many candidate mixtures are drawn from a Dirichlet
around the prior, scored by ŷ, and the output is the *mean of the top-k* candidates (the
paper's choice: averaging the best few smooths the regressor's noise, and a mean of
distributions is a distribution).

Regressors (scikit-learn, seeded):

- ``"gbr"``: ``GradientBoostingRegressor`` (shallow trees; the paper uses LightGBM, a gradient
  boosting library too). Non-linear, but piecewise constant: it cannot extrapolate, and needs
  many runs (the paper uses hundreds).
- ``"linear"``: ridge regression on p (the paper's linear baseline). With few runs (R ~ m + a
  few) it is the better-conditioned choice; its optimum over the candidates is the vertex of
  the lowest coefficient, softened by the top-k mean.

Fit quality is reported in-sample and by k-fold cross-validation (``folds``; leave-one-out when
folds >= R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mixlab.errors import ConfigError
from mixlab.lmo import mse_r2

Regressor = Literal["gbr", "linear"]
REGRESSORS: tuple[str, ...] = ("gbr", "linear")


def make_regressor(kind: str, seed: int = 0) -> Any:
    """A fresh, seeded scikit-learn regressor of the given kind."""
    from mixlab.data.embed import require

    require("sklearn", "RegMix regression")
    if kind == "gbr":
        from sklearn.ensemble import GradientBoostingRegressor

        return GradientBoostingRegressor(
            n_estimators=200, learning_rate=0.05, max_depth=2, subsample=1.0, random_state=seed
        )
    if kind == "linear":
        from sklearn.linear_model import Ridge

        return Ridge(alpha=1e-6)
    raise ConfigError(f"unknown regressor '{kind}'; choose one of {', '.join(REGRESSORS)}.")


@dataclass
class RegMixFit:
    """A regressor fitted from mixtures to one objective value per run."""

    kind: str
    model: Any
    """The fitted scikit-learn estimator (``predict`` takes [n, m] mixtures)."""
    mixtures: np.ndarray
    """[R, m] the runs' mixtures."""
    observed: np.ndarray
    """[R] the runs' objective values."""
    predicted: np.ndarray
    """[R] in-sample predictions."""
    cv_predicted: np.ndarray
    """[R] out-of-fold predictions (each run predicted by a model fitted without it)."""
    mse: float
    r2: float
    cv_mse: float
    cv_r2: float
    """R² of the out-of-fold predictions: how well the regressor predicts an unseen mixture
    (can be negative: worse than predicting the mean)."""

    def predict(self, mixtures: np.ndarray) -> np.ndarray:
        """[n] predicted objective of ``mixtures`` [n, m]."""
        return np.asarray(self.model.predict(np.asarray(mixtures, dtype=np.float64)), dtype=np.float64)


def fit_regmix(
    mixtures: np.ndarray, y: np.ndarray, kind: str = "gbr", seed: int = 0, folds: int = 5
) -> RegMixFit:
    """Fit ``kind`` on ``mixtures`` [R, m] -> ``y`` [R]; needs R >= 3 runs."""
    from sklearn.base import clone
    from sklearn.model_selection import KFold, cross_val_predict

    P = np.asarray(mixtures, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if P.ndim != 2 or y.shape != (P.shape[0],):
        raise ConfigError(f"mixtures {P.shape} must be [runs, domains] and y {y.shape} [runs].")
    n = P.shape[0]
    if n < 3:
        raise ConfigError(f"a RegMix regression needs at least 3 runs (cross-validation); got {n}.")
    if not np.all(np.isfinite(y)):
        raise ConfigError("some sweep losses are NaN or infinite; rerun or drop those runs.")
    model = make_regressor(kind, seed).fit(P, y)
    predicted = np.asarray(model.predict(P), dtype=np.float64)
    k = max(2, min(folds, n))
    cv = KFold(n_splits=k, shuffle=True, random_state=seed)
    cv_predicted = np.asarray(
        cross_val_predict(clone(make_regressor(kind, seed)), P, y, cv=cv), dtype=np.float64
    )
    mse, r2 = mse_r2(y[:, None], predicted[:, None])
    cv_mse, cv_r2 = mse_r2(y[:, None], cv_predicted[:, None])
    return RegMixFit(
        kind=kind, model=model, mixtures=P, observed=y, predicted=predicted,
        cv_predicted=cv_predicted, mse=float(mse[0]), r2=float(r2[0]),
        cv_mse=float(cv_mse[0]), cv_r2=float(cv_r2[0]),
    )  # fmt: skip


def dirichlet_candidates(
    prior: np.ndarray, n: int, concentration: float, seed: int
) -> np.ndarray:
    """[n, m] mixtures from Dirichlet(concentration · m · prior) (mean = ``prior``; with a
    uniform prior and concentration 1, uniform on the simplex). Seeded."""
    prior = np.asarray(prior, dtype=np.float64)
    if concentration <= 0:
        raise ConfigError(f"concentration must be > 0, got {concentration}.")
    alpha = np.maximum(concentration * prior.size * prior, 1e-3)
    return np.random.default_rng([seed, 0xC0FFEE]).dirichlet(alpha, size=n)


@dataclass
class RegMixResult:
    fit: RegMixFit
    weights: np.ndarray
    """[m] the mean of the top-k candidates: a distribution."""
    predicted_objective: float
    """ŷ(weights)."""
    top_k: int
    n_candidates: int


def regmix_mixture(
    mixtures: np.ndarray,
    y: np.ndarray,
    kind: str = "gbr",
    prior: np.ndarray | None = None,
    n_candidates: int = 100_000,
    top_k: int = 100,
    concentration: float = 1.0,
    seed: int = 0,
) -> RegMixResult:
    """Fit the regressor, score ``n_candidates`` Dirichlet mixtures, average the best ``top_k``.

    ``mixtures`` [R, m], ``y`` [R] (lower is better), ``prior`` [m] the candidates' mean
    (default uniform). The sampled mixtures themselves are candidates too.
    """
    P = np.asarray(mixtures, dtype=np.float64)
    m = P.shape[1] if P.ndim == 2 else 0
    if n_candidates < 1 or not 1 <= top_k <= n_candidates:
        raise ConfigError(f"need 1 <= top_k ({top_k}) <= n_candidates ({n_candidates}).")
    fit = fit_regmix(P, y, kind=kind, seed=seed)
    prior = np.full(m, 1.0 / m) if prior is None else np.asarray(prior, dtype=np.float64)
    cand = np.concatenate([P, dirichlet_candidates(prior, n_candidates, concentration, seed)])
    scores = fit.predict(cand)
    best = np.argsort(scores, kind="stable")[:top_k]
    w = cand[best].mean(axis=0)
    w = np.maximum(w, 0.0)
    w = w / w.sum()
    return RegMixResult(
        fit=fit,
        weights=w,
        predicted_objective=float(fit.predict(w[None, :])[0]),
        top_k=top_k,
        n_candidates=n_candidates,
    )
