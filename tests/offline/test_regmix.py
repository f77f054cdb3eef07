"""RegMix regression: exact on linear data, seeded, and its mixture is a valid distribution that
moves toward the domain the objective rewards."""

from __future__ import annotations

import numpy as np
import pytest

from mixlab.errors import ConfigError
from mixlab.offline.regmix import dirichlet_candidates, fit_regmix, regmix_mixture

COEF = np.array([3.0, 2.0, 4.5])  # the objective is lowest with all of domain 1


def _data(n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    P = np.random.default_rng(seed).dirichlet(np.ones(3), size=n)
    return P, P @ COEF


def test_linear_regression_is_exact_on_linear_data():
    P, y = _data()
    fit = fit_regmix(P, y, kind="linear")
    np.testing.assert_allclose(fit.predicted, y, atol=1e-5)
    np.testing.assert_allclose(fit.cv_predicted, y, atol=1e-5)
    assert fit.r2 > 1 - 1e-9 and fit.cv_r2 > 1 - 1e-9
    np.testing.assert_allclose(fit.predict(np.eye(3)), COEF, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "gbr"])
def test_mixture_is_a_distribution_toward_the_best_domain(kind):
    P, y = _data(24)
    res = regmix_mixture(P, y, kind=kind, n_candidates=5000, top_k=20, seed=0)
    assert np.all(res.weights >= 0) and abs(res.weights.sum() - 1) < 1e-12
    assert int(np.argmax(res.weights)) == 1
    again = regmix_mixture(P, y, kind=kind, n_candidates=5000, top_k=20, seed=0)
    np.testing.assert_array_equal(res.weights, again.weights)  # seeded


def test_top1_linear_picks_the_best_candidate_exactly():
    P, y = _data()
    res = regmix_mixture(P, y, kind="linear", n_candidates=2000, top_k=1, seed=3)
    cand = np.concatenate([P, dirichlet_candidates(np.full(3, 1 / 3), 2000, 1.0, 3)])
    np.testing.assert_allclose(res.weights, cand[np.argmin(cand @ COEF)], atol=1e-12)


def test_candidates_follow_the_prior():
    prior = np.array([0.6, 0.3, 0.1])
    cand = dirichlet_candidates(prior, 20000, 5.0, 0)
    np.testing.assert_allclose(cand.mean(axis=0), prior, atol=0.01)


def test_bad_input_is_a_clear_error():
    P, y = _data(2)
    with pytest.raises(ConfigError, match="at least 3 runs"):
        fit_regmix(P, y)
    P, y = _data()
    with pytest.raises(ConfigError, match="unknown regressor"):
        fit_regmix(P, y, kind="xgb")
    with pytest.raises(ConfigError, match="top_k"):
        regmix_mixture(P, y, n_candidates=10, top_k=20)
