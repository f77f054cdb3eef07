"""The mixtures of a sweep: distributions, seeded, prefix-stable, and a grid spread by
farthest-point order."""

from __future__ import annotations

import numpy as np
import pytest

from mixlab.errors import ConfigError
from mixlab.offline.sweep import (
    auto_resolution,
    farthest_point_order,
    lattice_size,
    round_mixture,
    simplex_grid,
    sweep_mixtures,
)

UNIFORM3 = np.full(3, 1 / 3)


def _valid(P: np.ndarray) -> None:
    assert np.all(P >= 0) and np.all(np.isfinite(P))
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)


def test_simplex_grid_and_resolution():
    g = simplex_grid(3, 2)
    assert g.shape == (6, 3) == (lattice_size(3, 2), 3)
    assert {tuple(r) for r in (g * 2).astype(int).tolist()} == {
        (0, 0, 2), (0, 1, 1), (0, 2, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0)}  # fmt: skip
    _valid(g)
    assert auto_resolution(3, 6) == 2 and auto_resolution(3, 7) == 3
    assert lattice_size(5, 4) == 70


def test_farthest_point_order_spreads():
    g = simplex_grid(3, 2)
    order = farthest_point_order(g, 1)
    assert sorted(order.tolist()) == list(range(6)) and order[0] == 1


@pytest.mark.parametrize("mode", ["dirichlet", "grid"])
def test_sweep_mixtures_are_valid_seeded_and_prefix_stable(mode):
    prior = np.array([0.5, 0.3, 0.2])
    P = sweep_mixtures(8, prior, mode=mode, seed=1, resolution=4)
    _valid(P)
    assert len({tuple(r) for r in P.tolist()}) == 8
    np.testing.assert_array_equal(P[:5], sweep_mixtures(5, prior, mode=mode, seed=1, resolution=4))
    np.testing.assert_array_equal(P, sweep_mixtures(8, prior, mode=mode, seed=1, resolution=4))
    if mode == "dirichlet":
        np.testing.assert_array_equal(P[0], prior)  # the prior is run 0
        assert not np.array_equal(P, sweep_mixtures(8, prior, mode=mode, seed=2))


def test_dirichlet_mean_is_the_prior():
    prior = np.array([0.6, 0.3, 0.1])
    P = sweep_mixtures(4000, prior, concentration=2.0, seed=0)
    np.testing.assert_allclose(P.mean(axis=0), prior, atol=0.01)


def test_round_mixture():
    q = round_mixture(np.array([1 / 3, 1 / 3, 1 / 3]))
    assert abs(q.sum() - 1) < 1e-12 and q.min() >= 0.333333


def test_bad_input():
    with pytest.raises(ConfigError, match="at least 1 run"):
        sweep_mixtures(0, UNIFORM3)
    with pytest.raises(ConfigError, match="2 domains"):
        sweep_mixtures(3, np.array([1.0]))
    with pytest.raises(ConfigError, match="fewer than --n"):
        sweep_mixtures(10, UNIFORM3, mode="grid", resolution=2)
    with pytest.raises(ConfigError, match="unknown sweep mode"):
        sweep_mixtures(3, UNIFORM3, mode="lhs")
    with pytest.raises(ConfigError, match="distribution"):
        sweep_mixtures(3, np.array([0.5, 0.6, 0.1]))
