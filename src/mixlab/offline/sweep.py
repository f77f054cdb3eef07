"""The mixtures of a sweep: a grid on the simplex, or Dirichlet draws around a prior (pure).

Both lists are *prefix-stable*: the first n mixtures of a sweep of n' > n runs are the n
mixtures of the smaller sweep, so growing a sweep (``--n``) reuses every run already trained.

- ``dirichlet``: mixture 0 is the prior itself; mixture i >= 1 is drawn from
  Dirichlet(concentration · m · prior) with its own generator seeded by (seed, i) (mean = the
  prior; a uniform prior with concentration 1 is uniform on the simplex).
- ``grid``: the simplex lattice {k / r : k ∈ N^m, Σ k = r} at resolution r (given, or the
  smallest whose lattice holds n points), visited in farthest-point order from the lattice point
  nearest the prior: each next point is the one farthest (L1) from all points taken so far, ties
  to the first in lattice order. Any prefix is spread over the whole simplex. With an automatic
  resolution the order is prefix-stable only among sweeps that share r.

Weights are rounded to ``DECIMALS`` decimals (the largest absorbs the rounding so they sum to 1
within 1e-12), so run configs are readable and a mixture always maps to the same config.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from mixlab.errors import ConfigError

DECIMALS = 6
MODES = ("dirichlet", "grid")


def round_mixture(p: np.ndarray, decimals: int = DECIMALS) -> np.ndarray:
    """``p`` [m] rounded to ``decimals``, renormalised by moving the rounding error onto the
    largest weight; non-negative, sums to 1 (within float rounding)."""
    q = np.round(np.maximum(np.asarray(p, dtype=np.float64), 0.0), decimals)
    if q.sum() <= 0:
        raise ConfigError(f"mixture {p} has no positive weight.")
    q[int(np.argmax(q))] += 1.0 - q.sum()
    return np.round(q, decimals + 3)


def lattice_size(m: int, resolution: int) -> int:
    """Points of the simplex lattice of ``m`` weights at ``resolution``: C(r + m - 1, m - 1)."""
    return math.comb(resolution + m - 1, m - 1)


def simplex_grid(m: int, resolution: int) -> np.ndarray:
    """[C(r + m - 1, m - 1), m] every mixture with weights in multiples of 1/r, in lexicographic
    order of the counts (stars and bars)."""
    if m < 1 or resolution < 1:
        raise ConfigError(f"a grid needs m >= 1 domains and resolution >= 1, got {m}, {resolution}.")
    rows = []
    for bars in combinations(range(resolution + m - 1), m - 1):
        edges = (-1, *bars, resolution + m - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(m)])
    return np.asarray(rows, dtype=np.float64) / resolution


def auto_resolution(m: int, n: int) -> int:
    """The smallest resolution whose lattice holds at least ``n`` points."""
    r = 1
    while lattice_size(m, r) < n:
        r += 1
    return r


def farthest_point_order(points: np.ndarray, start: int) -> np.ndarray:
    """[K] indices of ``points`` [K, m] in greedy farthest-point order (L1) from ``start``."""
    k = points.shape[0]
    order = [start]
    dist = np.abs(points - points[start]).sum(axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(dist))  # first index among ties
        order.append(nxt)
        dist = np.minimum(dist, np.abs(points - points[nxt]).sum(axis=1))
        dist[order] = -1.0
    return np.asarray(order, dtype=np.int64)


def sweep_mixtures(
    n: int,
    prior: np.ndarray,
    mode: str = "dirichlet",
    concentration: float = 1.0,
    seed: int = 0,
    resolution: int = 0,
) -> np.ndarray:
    """[n, m] the sweep's mixtures (rounded; see the module docstring). ``prior`` [m]."""
    prior = np.asarray(prior, dtype=np.float64)
    m = prior.size
    if n < 1:
        raise ConfigError(f"a sweep needs at least 1 run, got --n {n}.")
    if m < 2:
        raise ConfigError("a sweep needs at least 2 domains to mix.")
    if not np.all(np.isfinite(prior)) or np.any(prior < 0) or abs(prior.sum() - 1) > 1e-6:
        raise ConfigError(f"the prior must be a distribution, got {prior.tolist()}.")
    if mode == "dirichlet":
        if concentration <= 0:
            raise ConfigError(f"--concentration must be > 0, got {concentration}.")
        alpha = np.maximum(concentration * m * prior, 1e-3)
        draws = [prior] + [np.random.default_rng([seed, i]).dirichlet(alpha) for i in range(1, n)]
        return np.stack([round_mixture(p) for p in draws])
    if mode == "grid":
        r = resolution or auto_resolution(m, n)
        if lattice_size(m, r) < n:
            raise ConfigError(
                f"the grid at resolution {r} has {lattice_size(m, r)} mixtures of {m} domains, "
                f"fewer than --n {n}; raise --resolution or lower --n."
            )
        grid = simplex_grid(m, r)
        start = int(np.argmin(np.abs(grid - prior).sum(axis=1)))
        return np.stack([round_mixture(p) for p in grid[farthest_point_order(grid, start)[:n]]])
    raise ConfigError(f"unknown sweep mode '{mode}'; choose one of {', '.join(MODES)}.")
