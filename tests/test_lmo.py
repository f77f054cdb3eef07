"""The LMO mixing laws: fits recover known parameters from data that follow the laws, fit
quality is exact on noise-free data, and the method-vs-fitted distance is scale-free."""

from __future__ import annotations

import numpy as np
import pytest

from mixlab.lmo import (
    Transitions,
    centre_static,
    compare_A,
    fit_dynamic,
    fit_linear_law,
    fit_static_law,
    interval_mixtures,
    loss_rates,
    mse_r2,
    simulate_linear_law,
    static_law,
    window_slices,
)

A_TRUE = 1e-3 * np.array([[3.0, 0.5, 0.2], [0.4, 2.0, 0.1], [0.3, 0.6, 1.5]])


def _run(seed: int, steps: int = 40, every: int = 4, A=A_TRUE, L0=4.0) -> Transitions:
    """A run whose per-step eval losses follow the law exactly, evaluated every ``every`` steps,
    its mixture redrawn every step (logged every step)."""
    rng = np.random.default_rng(seed)
    mix = rng.dirichlet(np.full(3, 2.0), size=steps)
    L = simulate_linear_law(np.full(3, L0), A, mix)
    ev = np.arange(0, steps + 1, every)
    return Transitions.from_log(ev, L[ev], np.arange(1, steps + 1), mix)


# ------------------------------------------------------------------------------ building blocks


def test_interval_mixtures_and_rates_by_hand():
    mix = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75]])
    P = interval_mixtures(np.array([0, 2, 4, 6]), np.array([1, 2, 3, 4]), mix)
    np.testing.assert_array_equal(P[:2], [[0.5, 0.5], [0.375, 0.625]])
    assert np.all(np.isnan(P[2]))  # no snapshot in (4, 6]
    D = loss_rates(np.array([0, 2, 6]), np.array([[4.0, 3.0], [3.0, 2.5], [2.0, 2.5]]))
    np.testing.assert_array_equal(D, [[-0.5, -0.25], [-0.25, 0.0]])
    with pytest.raises(ValueError, match="increasing"):
        loss_rates(np.array([0, 2, 2]), np.zeros((3, 2)))


def test_window_slices():
    assert window_slices(10, 0) == [slice(0, 10)]
    assert window_slices(10, 4) == [slice(0, 4), slice(4, 10)]  # remainder joins the last
    assert window_slices(12, 4) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert window_slices(3, 4) == [slice(0, 3)]
    assert window_slices(0, 4) == []


def test_transitions_drop_intervals_without_data():
    L = np.array([[4.0, 4.0], [3.0, np.nan], [2.0, 2.0], [1.0, 1.0]])
    tr = Transitions.from_log(np.array([0, 1, 2, 3]), L, np.array([1, 2, 3]),
                              np.array([[0.5, 0.5]] * 3))  # fmt: skip
    # Intervals 0 and 1 touch the NaN loss.
    np.testing.assert_array_equal(tr.steps, [[2, 3]])
    np.testing.assert_array_equal(tr.rates, [[-1.0, -1.0]])


def test_mse_r2_by_hand():
    y = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    yhat = np.array([[1.0, 2.0], [2.5, 2.0], [3.0, 2.0]])
    mse, r2 = mse_r2(y, yhat)
    np.testing.assert_allclose(mse, [0.25 / 3, 0.0])
    assert r2[0] == pytest.approx(1 - 0.25 / 2.0)
    assert np.isnan(r2[1])  # constant column: R² undefined


# ------------------------------------------------------------------------------ dynamic law


def test_pooled_runs_recover_A_exactly_with_r2_one():
    runs = [_run(s) for s in range(3)]
    (wf,) = fit_dynamic(runs)
    assert wf.runs == [0, 1, 2] and wf.step_ranges == [(0, 40)] * 3
    assert wf.fit.rank == 3 and len(wf.fit.observed) == 30 and wf.fit.condition < 10
    # The mean mixture of an interval is exact for a constant A, so the fit is exact.
    np.testing.assert_allclose(wf.fit.A, A_TRUE, rtol=1e-9, atol=1e-15)
    q = wf.fit.quality
    assert np.all(q.r2 > 1 - 1e-12) and np.all(q.loo_r2 > 1 - 1e-12)
    assert np.all(q.mse < 1e-28)


def test_single_run_recovers_A_when_its_mixture_moves():
    (wf,) = fit_dynamic([_run(7, steps=60, every=3)])
    np.testing.assert_allclose(wf.fit.A, A_TRUE, rtol=1e-8, atol=1e-15)


def test_noisy_losses_recover_A_within_tolerance():
    # 5 runs, eval loss noise of 1e-3 (per-step drops are ~1e-3): A within 10% (Frobenius;
    # measured 4.9%).
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(5):
        mix = rng.dirichlet(np.full(3, 1.0), size=200)
        L = simulate_linear_law(np.full(3, 4.0), A_TRUE, mix)
        ev = np.arange(0, 201, 10)
        noisy = L[ev] + rng.normal(0.0, 1e-3, size=(len(ev), 3))
        runs.append(Transitions.from_log(ev, noisy, np.arange(1, 201), mix))
    (wf,) = fit_dynamic(runs)
    err = np.linalg.norm(wf.fit.A - A_TRUE) / np.linalg.norm(A_TRUE)
    assert err < 0.1
    # What is left is the noise: a rate is a difference of two noisy losses 10 steps apart,
    # variance 2 (1e-3)² / 10² = 2e-8.
    assert np.all(np.abs(wf.fit.quality.mse / 2e-8 - 1) < 0.2)


def test_windows_follow_a_changing_A():
    # A^t halves after step 24: windows of 6 transitions (24 steps at every=4) find both.
    A_t = [A_TRUE] * 24 + [A_TRUE / 2] * 24
    runs = []
    for s in range(3):
        rng = np.random.default_rng(s)
        mix = rng.dirichlet(np.full(3, 2.0), size=48)
        L = simulate_linear_law(np.full(3, 4.0), A_t, mix)
        ev = np.arange(0, 49, 4)
        runs.append(Transitions.from_log(ev, L[ev], np.arange(1, 49), mix))
    first, second = fit_dynamic(runs, window=6)
    assert first.step_ranges == [(0, 24)] * 3 and second.step_ranges == [(24, 48)] * 3
    np.testing.assert_allclose(first.fit.A, A_TRUE, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(second.fit.A, A_TRUE / 2, rtol=1e-8, atol=1e-15)


def test_static_run_identifies_only_A_p():
    p = np.array([0.6, 0.3, 0.1])
    mix = np.tile(p, (40, 1))
    L = simulate_linear_law(np.full(3, 4.0), A_TRUE, mix)
    ev = np.arange(0, 41, 4)
    fit = fit_dynamic([Transitions.from_log(ev, L[ev], np.arange(1, 41), mix)])[0].fit
    assert fit.rank == 1 and fit.condition == np.inf
    np.testing.assert_allclose(fit.A @ p, A_TRUE @ p, rtol=1e-10)
    # Minimum norm: every row of A is a multiple of p.
    np.testing.assert_allclose(fit.A, np.outer(A_TRUE @ p, p) / (p @ p), rtol=1e-10)
    assert np.all(np.isnan(fit.quality.r2))  # constant rates: nothing to explain


def test_ridge_loo_matches_brute_force_refits():
    rng = np.random.default_rng(3)
    P = rng.dirichlet(np.ones(3), size=9)
    D = -P @ A_TRUE.T + rng.normal(0, 1e-4, size=(9, 3))
    fit = fit_linear_law(P, D, ridge=0.1)
    lam = 0.1 * np.trace(P.T @ P) / 3
    coef = np.linalg.solve(P.T @ P + lam * np.eye(3), P.T @ D)
    np.testing.assert_allclose(fit.A, -coef.T, rtol=1e-10)
    for k in range(9):
        keep = np.arange(9) != k
        ck = np.linalg.solve(P[keep].T @ P[keep] + lam * np.eye(3), P[keep].T @ D[keep])
        np.testing.assert_allclose(fit.loo_predicted[k], P[k] @ ck, rtol=1e-9)
    # Ridge shrinks A toward 0.
    assert np.linalg.norm(fit.A) < np.linalg.norm(fit_linear_law(P, D).A)


def test_fit_linear_law_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must both be"):
        fit_linear_law(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="ridge"):
        fit_linear_law(np.ones((2, 2)), np.ones((2, 2)), ridge=-1)


# ------------------------------------------------------------------------------ static law

C = np.array([2.0, 2.5, 1.8])
B = np.array([1.0, 1.5, 0.8])
A_STATIC = np.array([[3.0, 0.5, 1.0], [0.2, 2.0, 0.5], [1.0, 0.0, 4.0]])


def test_centred_form_is_the_same_law_on_the_simplex():
    b, A = centre_static(B, A_STATIC)
    np.testing.assert_allclose(A.sum(axis=1), 0.0, atol=1e-15)
    P = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    np.testing.assert_allclose(static_law(P, C, b, A), static_law(P, C, B, A_STATIC), rtol=1e-14)


def test_static_law_recovers_parameters_exactly():
    P = np.random.default_rng(0).dirichlet(np.ones(3), size=12)
    fit = fit_static_law(P, static_law(P, C, B, A_STATIC))
    b, A = centre_static(B, A_STATIC)
    np.testing.assert_allclose(fit.c, C, atol=1e-8)
    np.testing.assert_allclose(fit.b, b, rtol=1e-8)
    np.testing.assert_allclose(fit.A, A, atol=1e-7)
    assert np.all(fit.quality.r2 > 1 - 1e-12) and np.all(fit.quality.loo_r2 > 1 - 1e-10)


def test_static_law_with_noise_within_tolerance():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(3), size=30)
    Y = static_law(P, C, B, A_STATIC) + rng.normal(0, 0.002, size=(30, 3))
    fit = fit_static_law(P, Y)
    _, A = centre_static(B, A_STATIC)
    # Measured: max |ΔA| 0.025, max |Δc| 0.002, R² >= 0.9997; tolerances 4-10x that.
    assert np.abs(fit.A - A).max() < 0.1
    assert np.abs(fit.c - C).max() < 0.02
    assert np.all(fit.quality.r2 > 0.999) and np.all(fit.quality.loo_r2 > 0.998)


def test_static_law_needs_m_plus_two_runs():
    P = np.random.default_rng(0).dirichlet(np.ones(3), size=4)
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_static_law(P, static_law(P, C, B, A_STATIC))


# ------------------------------------------------------------------------------ distance


def test_distance_is_zero_for_A_equal_up_to_positive_scale():
    d = compare_A(3.7 * A_TRUE, A_TRUE)
    assert d.cosine == pytest.approx(1.0, abs=1e-12)
    assert d.rel_error == pytest.approx(0.0, abs=1e-7)
    assert d.scale == pytest.approx(1 / 3.7, rel=1e-12)
    assert d.update_cosine == pytest.approx(1.0, abs=1e-12)
    # Scale-free whatever the units: a method A 1e9 times smaller compares the same.
    assert compare_A(1e-9 * A_TRUE, A_TRUE).rel_error == pytest.approx(0.0, abs=1e-7)


def test_distance_of_opposite_sign_is_maximal():
    d = compare_A(-A_TRUE, A_TRUE)
    assert d.cosine == pytest.approx(-1.0) and d.rel_error == 1.0 and d.scale == 0.0


def test_distance_by_hand():
    M = np.diag([1.0, 0.0])  # a diagonal (DoReMi-like) A
    F = np.array([[1.0, 1.0], [0.0, 1.0]])
    d = compare_A(M, F)
    assert d.cosine == pytest.approx(1 / np.sqrt(3))
    assert d.scale == pytest.approx(1.0)
    assert d.rel_error == pytest.approx(np.sqrt(2 / 3))  # = sqrt(1 - cos²)
    assert d.fitted_offdiag_share == pytest.approx(1 / np.sqrt(3))
    # Column sums (1, 0) and (1, 2): centred (0.5, -0.5) and (-0.5, 0.5), opposite updates.
    assert d.update_cosine == pytest.approx(-1.0)
    # Equal column sums: no update direction, so the update cosine is undefined.
    assert np.isnan(compare_A(np.ones((2, 2)), F).update_cosine)


def test_fewer_transitions_than_domains():
    P = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    fit = fit_linear_law(P, -P @ A_TRUE.T)
    assert fit.rank == 2 and fit.condition == np.inf
    np.testing.assert_allclose(fit.predicted, -P @ A_TRUE.T, rtol=1e-12)  # interpolated
    assert np.all(np.isnan(fit.loo_predicted))  # each point alone fixes a direction of A
