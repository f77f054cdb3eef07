"""Invariants every registered mixer must keep, under ordinary and adversarial signals."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tests.mixers.fakes import (
    REGIMES,
    assert_same,
    drive,
    make_ctx,
    plan_fields,
    synthetic_signals,
    torch_roundtrip,
)

from mixlab.mixers import MIXERS, build_mixer

M, BATCH, STEPS = 3, 8, 60

# Options that make every mixer change its mixture within a few dozen steps.
OPTIONS: dict[str, dict] = {
    "fixed": {"weights": {"a": 0.2, "b": 0.3, "c": 0.5}},
    "aioli": {"round_steps": 20, "lp_rounds": 1, "lp_steps": 2},
    "skillit": {"update_every": 4, "eval_every": 2, "graph_steps": 2},
    "dga": {"update_every": 2},
    "doge": {"update_every": 2},
    "importance": {"histogram": {"a": 1.0, "b": 2.0}},
}
# Names starting with "_" are mixers that other test modules register for their own use.
NAMES = sorted(n for n in MIXERS if not n.startswith("_"))


def build(name: str, **extra):
    return build_mixer(name, {**OPTIONS.get(name, {}), **extra}, make_ctx(M, STEPS, BATCH))


def check_plan(plan, batch: int = BATCH) -> None:
    w = np.asarray(plan.weights, dtype=np.float64)
    assert w.shape == (M,)
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    assert abs(w.sum() - 1.0) <= 1e-9, w.sum()
    if plan.counts is not None:
        c = np.asarray(plan.counts)
        assert c.dtype.kind == "i" and np.all(c >= 0) and c.sum() == batch, c
        np.testing.assert_array_equal(w, c / batch)
    if plan.loss_weights is not None:
        lw = np.asarray(plan.loss_weights, dtype=np.float64)
        assert np.all(np.isfinite(lw)) and np.all(lw >= 0) and abs(lw.sum() - 1.0) <= 1e-9, lw


def check_state_types(value, where: str = "state") -> None:
    """Only what torch.load(weights_only=True) restores as written: no numpy objects."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            check_state_types(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_state_types(v, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (int, float, bool, str, torch.Tensor), (
            f"{where}: {type(value).__name__} is not a plain Python value"
        )


def test_every_dynamic_method_is_registered_and_dynamic():
    for name in ("aioli", "doremi", "odm", "skillit"):
        assert MIXERS[name].dynamic is True
    for name in ("stratified", "natural", "temperature", "fixed"):
        assert MIXERS[name].dynamic is False


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("name", NAMES)
def test_plans_are_distributions_under_any_signal(name, regime):
    mixer = build(name)
    plans = drive(mixer, synthetic_signals(M, BATCH, regime), STEPS)
    for plan in [*plans, mixer.plan(STEPS)]:
        check_plan(plan)
    json.dumps(mixer.report(), allow_nan=False)  # logged every few steps: strict JSON


@pytest.mark.parametrize("name", NAMES)
def test_unobserved_steps_keep_invariants(name):
    # Non-finite steps are planned and counted but never observed.
    mixer = build(name)
    skip = frozenset(range(0, STEPS, 3))
    for plan in drive(mixer, synthetic_signals(M, BATCH, "normal", seed=5), STEPS, skip=skip):
        check_plan(plan)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if "floor" in {f.name for f in dataclasses.fields(MIXERS[n].Config)}]
)
@pytest.mark.parametrize("regime", ["normal", "huge"])
def test_floor_is_respected(name, regime):
    mixer = build(name, floor=0.1)
    plans = drive(mixer, synthetic_signals(M, BATCH, regime, seed=3), STEPS)
    trained = [p for p in plans if p.phase != "probe"]  # probes have their own exact mixture
    assert trained
    for plan in trained:
        assert np.min(plan.weights) >= 0.1 - 1e-12, plan.weights


@pytest.mark.parametrize("name", NAMES)
def test_plan_does_not_change_state(name):
    mixer = build(name)
    drive(mixer, synthetic_signals(M, BATCH), 17)
    before = mixer.state_dict()
    first = [plan_fields(mixer.plan(s)) for s in range(17, 30)]
    again = [plan_fields(mixer.plan(s)) for s in range(17, 30)]
    assert_same(first, again, "plans")
    assert_same(before, mixer.state_dict())


@pytest.mark.parametrize("cut", [0, 3, 11, 27])
@pytest.mark.parametrize("name", NAMES)
def test_resume_from_state_dict_is_exact(name, cut):
    """A mixer restored from a checkpoint after `cut` steps continues exactly like the original.

    For aioli (rounds of 20 steps, probes on steps 0-5 of each round) cut 3 is mid-probe and
    cut 27 is in the middle of round 1's probes.
    """
    signals = synthetic_signals(M, BATCH, "normal", seed=11)
    straight = build(name)
    plans = drive(straight, signals, STEPS)

    first = build(name)
    drive(first, signals, cut)
    state = first.state_dict()
    check_state_types(state)
    resumed = build(name)
    resumed.load_state_dict(torch_roundtrip(state))
    assert_same(resumed.state_dict(), state)
    rest = drive(resumed, signals, STEPS - cut, first=cut)

    assert_same([plan_fields(p) for p in rest], [plan_fields(p) for p in plans[cut:]], "plans")
    assert_same(resumed.state_dict(), straight.state_dict())
    assert_same(resumed.report(), straight.report(), "report")
