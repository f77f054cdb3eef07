"""The data mixing law: the fit recovers a known law, the simplex solver finds the exact optimum
of a known law (interior, on a face, with a floor), and every output is a distribution."""

from __future__ import annotations

import numpy as np
import pytest

from mixlab.errors import ConfigError
from mixlab.lmo import centre_static, static_law
from mixlab.offline.mixlaw import (
    dml_mixture,
    law_gradient,
    law_objective,
    objective_weights,
    solve_simplex,
)

C = np.array([2.0, 2.5, 1.8])
B = np.array([1.0, 1.5, 0.8])
A = np.array([[3.0, 0.5, 1.0], [0.2, 2.0, 0.5], [1.0, 0.0, 4.0]])


def _is_distribution(p: np.ndarray, floor: float = 0.0) -> None:
    assert np.all(np.isfinite(p)) and np.all(p >= floor - 1e-12)
    assert abs(p.sum() - 1.0) < 1e-12


def _diagonal_law_with_optimum(p_star: np.ndarray, a: np.ndarray, w: np.ndarray):
    """A law with A = diag(a) whose objective has its minimum at the interior point ``p_star``:
    stationarity -w_j b_j a_j exp(-a_j p_j) = λ for every j holds when b_j ∝ 1 / (w_j a_j
    exp(-a_j p*_j)); the objective is convex, so this KKT point is the optimum."""
    b = 1.0 / (w * a * np.exp(-a * p_star))
    return np.full(p_star.size, 1.5), b, np.diag(a)


def test_objective_weights():
    doms = ["a", "b", "c"]
    np.testing.assert_array_equal(objective_weights(doms), [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_array_equal(objective_weights(doms, "b"), [0, 1, 0])
    np.testing.assert_array_equal(objective_weights(doms, {"a": 1, "c": 3}), [0.25, 0, 0.75])
    with pytest.raises(ConfigError, match="neither 'avg' nor a domain"):
        objective_weights(doms, "zz")
    with pytest.raises(ConfigError, match="unknown domain"):
        objective_weights(doms, {"q": 1.0})
    with pytest.raises(ConfigError, match="not all 0"):
        objective_weights(doms, {"a": 0.0})


def test_gradient_matches_finite_differences():
    w = np.array([0.2, 0.5, 0.3])
    p = np.array([0.3, 0.3, 0.4])
    g = law_gradient(p, B, A, w)
    eps = 1e-6
    fd = [(law_objective(p + eps * e, C, B, A, w) - law_objective(p - eps * e, C, B, A, w)) / (2 * eps)
          for e in np.eye(3)]  # fmt: skip
    np.testing.assert_allclose(g, fd, rtol=1e-7)


@pytest.mark.parametrize("p_star", [[0.5, 0.3, 0.2], [0.1, 0.15, 0.75], [0.25, 0.25, 0.25, 0.25]])
def test_solver_returns_the_known_interior_optimum(p_star):
    p_star = np.asarray(p_star)
    m = p_star.size
    a = np.linspace(2.0, 5.0, m)
    w = np.full(m, 1.0 / m)
    c, b, A_ = _diagonal_law_with_optimum(p_star, a, w)
    sol = solve_simplex(c, b, A_, w)
    np.testing.assert_allclose(sol.weights, p_star, atol=1e-6)
    assert sol.gap < 1e-8
    assert sol.value == pytest.approx(law_objective(p_star, c, b, A_, w), rel=1e-12)
    _is_distribution(sol.weights)
    # The gauge of A does not matter on the simplex.
    b2, A2 = centre_static(b, A_)
    np.testing.assert_allclose(solve_simplex(c, b2, A2, w).weights, p_star, atol=1e-6)


def test_solver_matches_brute_force_on_a_dense_grid():
    w = np.array([0.2, 0.5, 0.3])
    sol = solve_simplex(C, B, A, w)
    n = 400
    grid = np.array([[i, j, n - i - j] for i in range(n + 1) for j in range(n + 1 - i)]) / n
    vals = static_law(grid, C, B, A) @ w
    assert sol.value <= vals.min() + 1e-12  # never worse than the best grid point
    np.testing.assert_allclose(sol.weights, grid[np.argmin(vals)], atol=2.0 / n)
    _is_distribution(sol.weights)


def test_solver_finds_a_vertex_and_respects_the_floor():
    # Target domain 0 only, and only domain 0's data lowers its loss: the optimum is all of it.
    A_ = np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    w = np.array([1.0, 0.0, 0.0])
    sol = solve_simplex(C, B, A_, w)
    np.testing.assert_allclose(sol.weights, [1.0, 0.0, 0.0], atol=1e-9)
    assert sol.gap < 1e-9
    floored = solve_simplex(C, B, A_, w, floor=0.05)
    np.testing.assert_allclose(floored.weights, [0.9, 0.05, 0.05], atol=1e-9)
    _is_distribution(floored.weights, floor=0.05)
    with pytest.raises(ConfigError, match="floor"):
        solve_simplex(C, B, A_, w, floor=0.5)


def test_law_fit_recovers_known_parameters_and_its_optimum():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(3), size=14)
    Y = static_law(P, C, B, A)
    res = dml_mixture(P, Y)
    b_true, A_true = centre_static(B, A)
    np.testing.assert_allclose(res.fit.c, C, rtol=1e-5)
    np.testing.assert_allclose(res.fit.b, b_true, rtol=1e-4)
    np.testing.assert_allclose(res.fit.A, A_true, atol=1e-4)
    assert np.all(res.fit.quality.r2 > 1 - 1e-9)
    truth = solve_simplex(C, B, A, np.full(3, 1 / 3))
    np.testing.assert_allclose(res.weights, truth.weights, atol=1e-4)
    assert res.predicted_objective == pytest.approx(truth.value, rel=1e-6)
    assert res.best_run == int(np.argmin(Y.mean(axis=1)))
    assert res.nearest_run_l1 >= 0
    _is_distribution(res.weights)


def test_target_objective_moves_the_mixture_toward_the_target():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(3), size=12)
    Y = static_law(P, C, B, A)
    avg = dml_mixture(P, Y)
    tgt = dml_mixture(P, Y, objective=objective_weights(["a", "b", "c"], "c"))
    assert tgt.weights[2] > avg.weights[2]
    _is_distribution(tgt.weights)


def test_too_few_runs_is_a_clear_error():
    P = np.random.default_rng(0).dirichlet(np.ones(3), size=4)
    with pytest.raises(ConfigError, match="at least 5 runs"):
        dml_mixture(P, static_law(P, C, B, A))
    with pytest.raises(ConfigError, match="NaN"):
        Y = static_law(np.tile(P, (2, 1)), C, B, A)
        Y[0, 0] = np.nan
        dml_mixture(np.tile(P, (2, 1)), Y)


def test_a_single_target_loss_law_is_fitted_and_solved():
    # The target's loss follows its own law over the 3-domain mixture (k = 1 column).
    c, b, a = np.array([1.2]), np.array([2.0]), np.array([[4.0, 1.0, 0.5]])
    P = np.random.default_rng(2).dirichlet(np.ones(3), size=9)
    y = static_law(P, c, b, a)
    res = dml_mixture(P, y, objective=np.array([1.0]))
    assert res.fit.A.shape == (1, 3) and res.fit.quality.loo_r2[0] > 1 - 1e-6
    np.testing.assert_allclose(res.weights, [1.0, 0.0, 0.0], atol=1e-6)  # domain 0 helps most
    assert res.predicted_objective == pytest.approx(1.2 + 2.0 * np.exp(-4.0), rel=1e-5)
    _is_distribution(res.weights)
