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
