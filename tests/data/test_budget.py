"""The repetition budget's projection (mixlab.data.budget), by hand-derived examples, by its
optimality conditions, and as a hard invariant of the sampler under adversarial plans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixlab.data.budget import (
    RepetitionBudget,
    apply_budget,
    budget_windows,
    capped_counts,
    project_capped,
)
from mixlab.data.format import DataDir
from mixlab.data.sampler import MixtureSampler
from mixlab.errors import ConfigError
from mixlab.mixers.base import Plan

INF = math.inf
# Results below are sums and products of a handful of doubles: exact to a few ulp of 1.
ATOL = 1e-12


def _is_distribution(q: np.ndarray) -> None:
    assert np.all(np.isfinite(q)) and np.all(q >= 0)
    assert abs(q.sum() - 1.0) < ATOL


# ---------------------------------------------------------------- budget_windows


def test_budget_windows_global_table_and_rounding():
    n = np.array([117, 100, 29])
    # floor(0.75 * n): 87.75 -> 87, 75, 21.75 -> 21.
    assert budget_windows(0.75, ["a", "b", "c"], n).tolist() == [87, 75, 21]
    # 0.29 * 100 = 28.999999999999996 in doubles; the budget is 29 windows, not 28.
    assert budget_windows({"b": 0.29}, ["a", "b", "c"], n).tolist() == [INF, 29, INF]
    # 0 = no budget, and so is a domain left out of the table.
    assert budget_windows({"a": 0, "c": 2}, ["a", "b", "c"], n).tolist() == [INF, INF, 58]
    assert np.all(np.isinf(budget_windows(None, ["a", "b", "c"], n)))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), {"zz": 1.0}, {"a": -0.5}])
def test_budget_windows_refuses_bad_values(bad):
    with pytest.raises(ConfigError, match="max_epochs"):
        budget_windows(bad, ["a", "b", "c"], [10, 10, 10])


# ---------------------------------------------------------------- project_capped


def test_projection_unchanged_when_no_cap_binds():
    w = np.array([0.2, 0.3, 0.5])
    q = project_capped(w, [0.2, INF, 0.6])  # 0.2 <= 0.2 is not a binding cap
    assert q.tolist() == w.tolist()


def test_projection_one_cap_redistributes_proportionally():
    # Cap domain 0 at 0.25: lam = (1 - 0.25) / (0.3 + 0.2) = 1.5, so q = [0.25, 0.45, 0.30].
    q = project_capped([0.5, 0.3, 0.2], [0.25, INF, INF])
    np.testing.assert_allclose(q, [0.25, 0.45, 0.30], rtol=0, atol=ATOL)
    _is_distribution(q)


def test_projection_cascade_of_caps():
    # w = [0.6, 0.3, 0.1], caps [0.2, 0.35, inf]. Cap 0: lam = 0.8 / 0.4 = 2, then domain 1
    # would get 0.6 > 0.35, so cap it too: lam = (1 - 0.55) / 0.1 = 4.5, q2 = 0.45.
    q = project_capped([0.6, 0.3, 0.1], [0.2, 0.35, INF])
    np.testing.assert_allclose(q, [0.2, 0.35, 0.45], rtol=0, atol=ATOL)
    _is_distribution(q)


def test_projection_exhausted_domain_is_dropped():
    # A cap of 0 (no window left): its weight goes to the others in proportion, 0.4 : 0.2.
    q = project_capped([0.4, 0.2, 0.4], [INF, INF, 0.0])
    np.testing.assert_allclose(q, [2 / 3, 1 / 3, 0.0], rtol=0, atol=ATOL)
    assert q[2] == 0.0


def test_projection_mass_the_support_cannot_hold_goes_to_zero_weight_domains():
    # All weight on domain 0, capped at 0.25: 0.75 goes to domains 1, 2 uniformly (0.375 each).
    q = project_capped([1.0, 0.0, 0.0], [0.25, 0.5, INF])
    np.testing.assert_allclose(q, [0.25, 0.375, 0.375], rtol=0, atol=ATOL)
    # ... up to their caps: domain 1 takes 0.3, domain 2 the remaining 0.45.
    q = project_capped([1.0, 0.0, 0.0], [0.25, 0.3, INF])
    np.testing.assert_allclose(q, [0.25, 0.3, 0.45], rtol=0, atol=ATOL)


def test_projection_refuses_infeasible_caps():
    with pytest.raises(ConfigError, match="no mixture satisfies"):
        project_capped([1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.4])


def test_projection_is_the_kl_projection_by_its_optimality_conditions():
    """KKT of min KL(q || w) s.t. sum q = 1, 0 <= q <= c (w > 0): there is a lam with
    q_i = lam * w_i where q_i < c_i, and q_i = c_i <= lam * w_i where the cap binds. The problem
    is strictly convex, so these conditions identify the unique minimiser."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = int(rng.integers(2, 8))
        w = rng.dirichlet(np.full(m, 0.5)) + 1e-3
        w /= w.sum()
        c = rng.uniform(0.0, 1.0, m)
        c[rng.random(m) < 0.3] = INF
        if np.minimum(c, 1).sum() < 1:
            continue
        q = project_capped(w, c)
        _is_distribution(q)
        assert np.all(q <= np.minimum(c, 1) + ATOL)
        free = q < np.minimum(c, 1) - 1e-9
        assert free.any()
        lam = q[free] / w[free]
        # One ratio for every uncapped domain (float quotients: 1e-9 relative).
        np.testing.assert_allclose(lam, lam[0], rtol=1e-9)
        assert np.all(q[~free] <= lam[0] * w[~free] * (1 + 1e-9))
        assert lam[0] >= 1 - 1e-12  # mass only moves towards uncapped domains


# ---------------------------------------------------------------- capped_counts


def test_capped_counts_by_hand():
    # Floors [2, 2, 3] leave 1 sample: domain 0 is at its cap 2, so domain 1 (frac .5) gets it.
    assert capped_counts([2.5, 2.5, 3.0], [2, INF, INF], 8).tolist() == [2, 3, 3]
    # Equal fractions: the leftovers go to the lower indices (as closest_counts does).
    assert capped_counts([8 / 3] * 3, [INF] * 3, 8).tolist() == [3, 3, 2]
    # 8 * 0.375 = 3 exactly though the double product may not be.
    assert capped_counts([8 * 0.375, 8 * 0.375, 8 * 0.25], [INF, INF, 2], 8).tolist() == [3, 3, 2]
    with pytest.raises(ConfigError, match="fewer than"):
        capped_counts([4, 4], [3, 3], 8)


# ---------------------------------------------------------------- apply_budget


def test_apply_budget_returns_the_plan_itself_when_nothing_binds():
    plan = Plan(weights=np.array([0.2, 0.3, 0.5]), phase="x")
    assert apply_budget(plan, np.array([INF, 100, 8]), 8, 10) is plan
    counts = Plan(weights=np.array([0.75, 0.125, 0.125]), counts=np.array([6, 1, 1]))
    assert apply_budget(counts, np.array([6, 1, 50]), 8, 10) is counts


def test_apply_budget_drops_an_exhausted_domain():
    plan = Plan(weights=np.full(3, 1 / 3))
    out = apply_budget(plan, np.array([INF, INF, 0.0]), 8, 10)
    assert out.counts is None  # a, b have >= 8 windows left: i.i.d. draws cannot overdraw
    np.testing.assert_allclose(out.weights, [0.5, 0.5, 0.0], rtol=0, atol=ATOL)


def test_apply_budget_uses_exact_counts_when_a_draw_could_overdraw():
    # 3 windows of c left, weight 1/3 (expected 2.67 <= 3, but i.i.d. could draw 8): counts.
    out = apply_budget(Plan(weights=np.full(3, 1 / 3)), np.array([INF, INF, 3.0]), 8, 10)
    assert out.counts.tolist() == [3, 3, 2]
    np.testing.assert_allclose(out.weights, [3 / 8, 3 / 8, 2 / 8], rtol=0, atol=ATOL)
    # 2 left, weight 0.6: cap 2/8 binds, lam = 0.75 / 0.4, q = [.375, .375, .25] -> [3, 3, 2].
    out = apply_budget(Plan(weights=np.array([0.2, 0.2, 0.6])), np.array([INF, INF, 2.0]), 8, 10)
    assert out.counts.tolist() == [3, 3, 2]


def test_apply_budget_caps_counts_and_gives_freed_samples_in_proportion():
    plan = Plan(weights=np.array([0.75, 0.125, 0.125]), counts=np.array([6, 1, 1]), phase="probe")
    # 2 left on domain 0: the 4 freed samples split 1 : 1 between the others.
    out = apply_budget(plan, np.array([2.0, INF, INF]), 8, 10)
    assert out.counts.tolist() == [2, 3, 3] and out.phase == "probe"
    # And with domain 1 capped at 1 too, everything freed goes to domain 2.
    out = apply_budget(plan, np.array([2.0, 1.0, INF]), 8, 10)
    assert out.counts.tolist() == [2, 1, 5]
    # The even pace does not touch counts: 10 steps left would cap domain 0 at 0.25 / 10.
    out = apply_budget(plan, np.array([20.0, INF, INF]), 8, 10, pace="even")
    assert out is plan


def test_apply_budget_even_pace_spreads_the_budget():
    # 20 windows of c over 10 steps of 8: share at most 20 / 80 = 0.25; lam = 0.75 / (2/3).
    out = apply_budget(Plan(weights=np.full(3, 1 / 3)), np.array([INF, INF, 20.0]), 8, 10, "even")
    assert out.counts is None
    np.testing.assert_allclose(out.weights, [0.375, 0.375, 0.25], rtol=0, atol=ATOL)
    # The greedy pace leaves that plan alone (20 >= 8: no overdraw possible this step).
    plan = Plan(weights=np.full(3, 1 / 3))
    assert apply_budget(plan, np.array([INF, INF, 20.0]), 8, 10, "greedy") is plan


def test_apply_budget_moves_loss_weight_of_unsampled_domains():
    plan = Plan(weights=np.full(3, 1 / 3), loss_weights=np.array([0.2, 0.3, 0.5]))
    out = apply_budget(plan, np.array([INF, INF, 0.0]), 8, 10)
    # c is no longer sampled: its 0.5 of loss weight goes 0.2 : 0.3 to a and b.
    np.testing.assert_allclose(out.loss_weights, [0.4, 0.6, 0.0], rtol=0, atol=ATOL)
    # A domain still sampled keeps its loss weight (the factor w / q corrects for its q).
    out = apply_budget(plan, np.array([INF, INF, 20.0]), 8, 10, "even")
    assert out.loss_weights.tolist() == [0.2, 0.3, 0.5]


def test_apply_budget_refuses_when_the_budget_is_spent():
    with pytest.raises(ConfigError, match="budget is spent"):
        apply_budget(Plan(weights=np.full(3, 1 / 3)), np.array([3.0, 2.0, 2.0]), 8, 1)


# ---------------------------------------------------------------- the sampler never overdraws


def _adversarial_plan(rng: np.random.Generator, m: int, batch: int) -> Plan:
    kind = rng.integers(4)
    if kind == 0:  # all on one domain
        w = np.zeros(m)
        w[rng.integers(m)] = 1.0
        return Plan(weights=w)
    if kind == 1:  # exact counts, as Aioli's probes
        c = rng.multinomial(batch, rng.dirichlet(np.ones(m)))
        return Plan(weights=c / batch, counts=c)
    if kind == 2:  # loss-weighted uniform sampling, as DoReMi
        return Plan(weights=np.full(m, 1 / m), loss_weights=rng.dirichlet(np.ones(m)))
    return Plan(weights=rng.dirichlet(np.full(m, 0.3)))


@pytest.mark.parametrize("pace", ["greedy", "even"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_never_draws_past_the_budget(tiny_data, pace, seed):
    """Hard invariant: with plans that push hardest on one domain, drawn <= budget after every
    batch, down to a budget that is all but spent at the last step."""
    data = DataDir.open(tiny_data)
    batch = 8
    sampler = MixtureSampler(data, "train", 16, batch, seed)
    n = sampler.n_windows  # a 117, b 117, c 29 windows of 17 tokens
    limit = np.floor(0.75 * n)  # 87, 87, 21: 195 windows
    steps = int(limit.sum()) // batch  # 24 steps use 192 of them
    budget = RepetitionBudget.from_config(0.75, pace, sampler.domains, n, steps, batch)
    assert budget is not None and budget.limit.tolist() == limit.tolist()
    rng = np.random.default_rng(seed)
    for step in range(steps):
        plan = budget.apply(_adversarial_plan(rng, 3, batch), sampler.windows_drawn, sampler.step)
        _is_distribution(np.asarray(plan.weights))
        if plan.loss_weights is not None:
            _is_distribution(np.asarray(plan.loss_weights))
        if plan.counts is not None:
            sampler.next_batch(counts=plan.counts)
        else:
            sampler.next_batch(weights=plan.weights)
        assert np.all(sampler.windows_drawn <= limit), (step, sampler.windows_drawn)
    assert sampler.windows_drawn.sum() == steps * batch


def test_from_config_refuses_a_budget_that_cannot_fill_the_run():
    # 0.5 * [117, 117, 29] -> 58 + 58 + 14 = 130 windows: 16 steps of 8, not 24.
    with pytest.raises(ConfigError, match="lasts 16 steps"):
        RepetitionBudget.from_config(0.5, None, ["a", "b", "c"], [117, 117, 29], 24, 8)
    # A domain without a budget makes any run feasible.
    assert RepetitionBudget.from_config({"c": 0.5}, None, ["a", "b", "c"], [117, 117, 29], 24, 8)
    assert RepetitionBudget.from_config(None, None, ["a", "b", "c"], [117, 117, 29], 24, 8) is None
    assert RepetitionBudget.from_config({"c": 0}, None, ["a", "b", "c"], [1, 1, 1], 24, 8) is None
    with pytest.raises(ConfigError, match="budget_pace"):
        RepetitionBudget.from_config(1.0, "fast", ["a"], [10], 1, 8)
