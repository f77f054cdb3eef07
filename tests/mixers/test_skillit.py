"""Skill-It: the skills graph, the windowed multiplicative update, and its schedule, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.mixers.fakes import FakeSignals, make_ctx

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.skillit import skillit_update, skills_graph

DELTAS = np.array([[0.5, 0.1], [0.0, 0.4]])


def skillit(m=2, total=20, **options):
    return build_mixer("skillit", options, make_ctx(m, total))


def test_skills_graph_is_relative_loss_drop():
    np.testing.assert_allclose(
        skills_graph(DELTAS, np.array([5.0, 4.0])), [[0.1, 0.025], [0.0, 0.1]], rtol=1e-15
    )
    # A base loss that is 0, negative or NaN gives that column no edge; so does a NaN delta.
    A = skills_graph(np.array([[1.0, np.nan], [1.0, 2.0]]), np.array([0.0, 2.0]))
    np.testing.assert_array_equal(A, [[0.0, 0.0], [0.0, 1.0]])


def test_skillit_update():
    A = np.array([[0.1, 0.025], [0.0, 0.1]])
    p = skillit_update(np.array([0.5, 0.5]), A, np.array([10.5, 7.5]), 0.2)  # A L = [1.2375, 0.75]
    first = 1.0 / (1.0 + math.exp(-0.2 * (1.2375 - 0.75)))
    np.testing.assert_allclose(p, [first, 1 - first], rtol=1e-14)
    p = skillit_update(np.array([0.25, 0.75]), A, np.array([1.0, 1.0]), 1.0)
    e0, e1 = 0.25 * math.exp(0.125), 0.75 * math.exp(0.1)
    np.testing.assert_allclose(p, [e0 / (e0 + e1), e1 / (e0 + e1)], rtol=1e-14)
    np.testing.assert_array_equal(
        skillit_update(np.array([0.5, 0.5]), A, np.array([1e300, 0.0]), 1.0), [1.0, 0.0]
    )


def evals(step):
    return np.array([5.0 - 0.1 * step, 4.0 - 0.05 * step])


def test_schedule_hand_computed():
    """Graph after step 1; evals recorded after steps 1, 3, 5, 7; updates after steps 3 and 7."""
    mixer = skillit(eta=0.2, window=3, eval_every=2, update_every=4, graph_steps=5, graph_at_step=1)
    plans, asked, branch_calls = [], [], []
    for step in range(8):
        plans.append(mixer.plan(step).weights)
        s = FakeSignals(step, eval=evals(step), branch=lambda mix, n: DELTAS)
        mixer.observe(step, s)
        asked += [step] * s.calls.count("eval_losses")
        branch_calls += s.branch_calls
    plans.append(mixer.plan(8).weights)
    assert asked == [1, 3, 5, 7]
    assert len(branch_calls) == 1
    np.testing.assert_array_equal(branch_calls[0][0], np.eye(2))
    assert branch_calls[0][1] == 5

    A = DELTAS / evals(1)[None, :]
    np.testing.assert_allclose(mixer.report()["A"], A, rtol=1e-15)

    def p_of(loss_sum):
        z = 0.2 * A @ loss_sum
        return np.exp(z) / np.exp(z).sum()

    np.testing.assert_array_equal(plans[0], [0.5, 0.5])
    np.testing.assert_array_equal(plans[1], [0.5, 0.5])
    np.testing.assert_allclose(plans[2], p_of(np.ones(2)), rtol=1e-14)  # published initialisation
    np.testing.assert_allclose(plans[4], p_of(evals(1) + evals(3)), rtol=1e-14)
    np.testing.assert_allclose(plans[8], p_of(evals(3) + evals(5) + evals(7)), rtol=1e-14)


def test_default_graph_steps_is_a_tenth_of_the_run():
    mixer = skillit(total=250)
    s = FakeSignals(0, eval=evals(0), branch=lambda mix, n: DELTAS)
    mixer.observe(0, s)
    assert s.branch_calls[0][1] == 25


def test_non_finite_eval_is_left_out_of_the_window():
    mixer = skillit(window=2, eval_every=1, update_every=1, graph_steps=1)
    readings = [evals(0), np.array([np.nan, 1.0]), evals(2)]
    for step, ev in enumerate(readings):
        mixer.observe(step, FakeSignals(step, eval=ev, branch=lambda mix, n: DELTAS))
    A = DELTAS / evals(0)[None, :]
    z = 0.2 * A @ (evals(0) + evals(2))
    np.testing.assert_allclose(mixer.plan(3).weights, np.exp(z) / np.exp(z).sum(), rtol=1e-14)


def test_p0_and_floor():
    mixer = skillit(p0={"a": 1.0, "b": 3.0}, floor=0.2)
    np.testing.assert_array_equal(mixer.plan(0).weights, [0.25, 0.75])
    mixer.observe(
        0,
        FakeSignals(
            0, eval=np.array([1e30, 1.0]), branch=lambda mix, n: np.array([[1e30, 0.0], [0.0, 0.0]])
        ),
    )
    mixer.observe(1, FakeSignals(1, eval=np.array([1e30, 1.0])))
    assert np.min(mixer.plan(2).weights) >= 0.2 - 1e-15


@pytest.mark.parametrize(
    "options, message",
    [
        ({"window": 0}, "window"),
        ({"graph_steps": 0}, "graph_steps"),
        ({"floor": 0.6}, "above 1/m"),
        ({"p0": {"a": 1.0}}, "missing domain"),
        ({"eta": float("nan")}, "eta must be"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        skillit(**options)


# ---------------------------------------------------------------------------------------------
# Against the reference update, re-implemented here in numpy.


def reference_plans(p0, start, branch_end, ev, eta, window, eval_every, update_every, graph_at,
                    steps):  # fmt: skip
    """The mixture of every step, from the Skill-It reference's formulas (not from mixlab):

    - skills graph, HazyResearch/aioli ``mixing_law_fitting.py skills_graph``:
      ``A[i] = (start_loss - end_loss) / start_loss`` of the run trained on domain i alone;
    - mixture, HazyResearch/skill-it ``trainer/mw_trainer.py`` (and aioli
      ``trainer/skillit_trainer.py``): ``weights = weights_init * exp(eta * graph.dot(loss_arr))``
      with ``loss_arr`` the sum of the last ``window`` recorded eval-loss vectors, and at the
      start ``graph.dot(ones)`` (the paper's Algorithm 1 initialisation; see the note in
      ``test_plans_follow_the_reference_update_over_many_updates``), normalised to sum to 1.

    The record/update schedule is mixlab's documented one (skillit.py docstring): the graph and a
    record after step ``graph_at``, records after steps s with (s + 1) % eval_every == 0,
    updates after steps with (s + 1) % update_every == 0.
    """
    p0 = np.asarray(p0, dtype=np.float64) / np.sum(p0)
    weights, graph, records, last, plans = p0, None, [], -1, []
    for s in range(steps):
        plans.append(weights)
        if graph is None:
            if s < graph_at:
                continue
            graph = (start - branch_end) / start[None, :]
            records.append(start)
            last = s
            weights = p0 * np.exp(eta * graph.dot(np.ones(p0.size)))
            weights = weights / weights.sum()
        if (s + 1) % eval_every == 0 and last != s:
            records.append(ev(s))
            last = s
        if (s + 1) % update_every == 0:
            loss_arr = np.array(records[-window:]).sum(axis=0)
            weights = p0 * np.exp(eta * graph.dot(loss_arr))
            weights = weights / weights.sum()
    plans.append(weights)
    return np.array(plans)


def test_plans_follow_the_reference_update_over_many_updates():
    """3 domains, a non-uniform prior, a window shorter than the history, evals every 3 steps
    and updates every 4 (so windows straddle updates), graph after step 2: 40 steps, 10 updates
    (after steps 3, 7, ..., 39).

    Prior note: with a prior (``--mw_prior``) the reference's first mixture uses
    ``graph.dot(weights_init)`` (mw_trainer.py: ``loss_init = weights_init``), i.e. the *raw
    prior* as the loss vector; mixlab uses a vector of ones (Algorithm 1 of the paper, and the
    reference without a prior). Only the mixture between the graph and the first update differs.
    """
    p0 = np.array([1.0, 2.0, 5.0])  # any positive scale; mixlab normalises it to [1, 2, 5] / 8

    def ev(s):
        # Domain 0 learns fast, 1 slowly, 2 (say, noise) never: its loss even creeps up.
        return np.array([4.0 * 0.97**s, 4.2 - 0.01 * s, 4.3 + 0.002 * s])

    graph_at = 2
    start = ev(graph_at)
    # Losses of the branch trained on domain i alone (row i): each helps itself, 0 helps 1,
    # training on 2 helps no one and hurts 0.
    branch_end = start[None, :] - np.array([[0.6, 0.2, 0.0], [0.05, 0.3, -0.01], [-0.1, 0.0, 0.0]])

    options = dict(eta=0.3, window=2, eval_every=3, update_every=4, graph_at_step=graph_at,
                   graph_steps=7)  # fmt: skip
    mixer = build_mixer(
        "skillit", {**options, "p0": {"a": 1.0, "b": 2.0, "c": 5.0}}, make_ctx(3, total_steps=40)
    )
    plans = []
    for step in range(40):
        plans.append(mixer.plan(step).weights)
        mixer.observe(step, FakeSignals(step, eval=ev(step),
                                        branch=lambda mix, n: start[None, :] - branch_end))
    plans.append(mixer.plan(40).weights)

    expected = reference_plans(p0, start, branch_end, ev, 0.3, 2, 3, 4, graph_at, 40)
    # mixlab exponentiates in log space (softmax of log p0 + drive), the reference multiplies
    # p0 by exp(drive): the same value up to a few roundings of numbers of order 1, so 1e-12
    # relative (about 5000 ulps) is far above the float error and far below any real change
    # (the smallest change between two consecutive updates here is > 1e-4).
    np.testing.assert_allclose(np.array(plans), expected, rtol=1e-12, atol=0)
    # The test exercises what it claims: the mixture moved at the graph step and 10 updates,
    # and domain 2, which helps no one, ends below its prior share 5/8.
    changes = np.flatnonzero(np.any(np.diff(expected, axis=0) != 0, axis=1))
    assert changes.size == 11 and np.min(np.abs(np.diff(expected, axis=0))[changes].max(1)) > 1e-4
    assert expected[-1, 2] < 5 / 8
