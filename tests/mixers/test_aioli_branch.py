"""Aioli with ``probes = "branch"``: LearnParams on branch copies of the model.

In a world that follows the linear dynamic mixing law exactly (a branch that trains ``steps``
steps on the realised probe mixture R_j lowers the losses by steps * A R_j), the variant must
recover A, and every step of the run must train on p (no probe phase). The expected mixtures
are computed here from A directly (normalising A is invariant to its scale, so the drops over
lp_steps steps give the same normalised A as A itself). A real tiny run checks the batches the
trainer drew, the extra steps and an exact resume; a driver without branch copies refuses it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.mixers.fakes import LinearLawSim, drive, make_ctx, torch_roundtrip
from tests.train.conftest import assert_resume_identical, tiny_overrides

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.aioli import Aioli
from mixlab.train.config import load_config


def aioli(m, total, batch=8, **options):
    return build_mixer("aioli", {"probes": "branch", **options}, make_ctx(m, total, batch))


def law_world(A: np.ndarray, batch: int, L0: float = 100.0, nan_probe: int | None = None):
    """LinearLawSim whose signals also train branches under the same law."""
    sim = LinearLawSim(A, np.full(A.shape[0], L0), batch)

    def branch(mixtures: np.ndarray, steps: int) -> np.ndarray:
        drops = steps * mixtures @ A.T  # row k: the drop steps * A R_k
        if nan_probe is not None:
            drops[np.argmax(mixtures, axis=1) == nan_probe] = np.nan
        return drops

    calls: list = []

    def make(step, plan):
        sig = sim(step, plan)
        sig.branch = branch
        calls.append(sig)
        return sig

    return sim, make, calls


def branch_calls(signals) -> list[tuple[int, np.ndarray, int, np.ndarray, int]]:
    """(step, mixtures, steps, counts, stream) of every branch call, in order."""
    out = []
    for s in signals:
        for (mix, steps), opt in zip(s.branch_calls, s.branch_options, strict=True):
            out.append((s.step, mix, steps, opt["counts"], opt["stream"]))
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def normalised(A: np.ndarray) -> np.ndarray:
    shifted = A - min(A.min(), 0.0)
    return shifted / shifted.sum()


A_3 = np.array([[0.1, 0.5, 0.2], [0.1, 0.4, 0.1], [0.1, 0.3, 0.3]])  # column sums .3, 1.2, .6


def test_recovers_A_from_branches_and_never_probes_the_run():
    """m = 7, batch 8 (realised probes differ from P_j), 2 sweeps of 3 steps, rounds of 10.

    B = 3 A R^T and R = mean realised composition are exact up to rounding (~1e-16 relative);
    solving with R, whose condition number is a few units, leaves ~1e-15: rtol 1e-9 is slack
    for float error only, while an estimate with the idealised P_j would be off by > 0.1 (the
    in-place variant's test_recovers_A_exactly_with_realised_probe_mixtures)."""
    rng = np.random.default_rng(0)
    A = rng.uniform(-0.2, 1.0, size=(7, 7))
    mixer = aioli(7, 30, round_steps=10, lp_rounds=2, lp_steps=3, normalize=False, ema=0.0)
    sim, make, signals = law_world(A, 8)
    plans = drive(mixer, make, 30)
    np.testing.assert_allclose(np.asarray(mixer.report()["A_raw"]) / 3, A, rtol=1e-9, atol=1e-12)
    # Every round measures the same A, the anchor is the initial uniform p: p = softmax(eta
    # column sums of A_raw = 3 A), and every step of the run trains exactly on it.
    p = softmax(0.2 * (3 * A).sum(axis=0))
    np.testing.assert_allclose(mixer.report()["p"], p, rtol=1e-12)
    for step, plan in enumerate(plans):
        assert plan.counts is None and plan.phase == "train", step
        np.testing.assert_allclose(plan.weights, p, rtol=1e-12, err_msg=str(step))
    np.testing.assert_allclose(np.array(sim.trained), np.tile(p, (30, 1)), rtol=1e-12)
    assert mixer.report()["rounds"] == 3 and mixer.report()["rounds_skipped"] == 0

    # The branches: one call per round (start, after steps 9 and 19), each with a fresh data
    # stream, lp_rounds * m exact probe batches of lp_steps steps.
    calls = branch_calls(signals)
    assert [(c[0], c[2], c[4]) for c in calls] == [(-1, 3, 1), (9, 3, 2), (19, 3, 3)]
    for _, mixtures, _, counts, _ in calls:
        assert counts.shape == (14, 7) and counts.dtype.kind == "i"
        np.testing.assert_array_equal(mixtures, counts / 8)
        assert np.all(counts.sum(axis=1) == 8)
        for k in range(2):
            sweep = counts[7 * k : 7 * (k + 1)]
            # Probe j holds round(0.625 * 8) = 5 samples of domain j; over a sweep every domain
            # gets exactly one batch's worth.
            np.testing.assert_array_equal(np.diag(sweep), np.full(7, 5))
            np.testing.assert_array_equal(sweep.sum(axis=0), np.full(7, 8))
        assert not np.array_equal(counts[:7], counts[7:])  # the sweeps place leftovers apart


def test_prior_phase_then_adaptive_rounds_hand_computed():
    """Prior [.5 .25 .25] for 4 steps, rounds of 8 (measured after steps 3, 11, 19), the
    adaptive variant (anchor previous, eta 1), normalised A with an EMA of equal matrices:
    after round r, p ∝ exp((r + 1) * column sums of normalise(A))."""
    mixer = aioli(
        3,
        28,
        batch=64,
        prior={"a": 2, "b": 1, "c": 1},
        prior_steps=4,
        round_steps=8,
        lp_rounds=1,
        lp_steps=2,
        variant="adaptive",
    )
    _, make, signals = law_world(A_3, 64)
    plans = drive(mixer, make, 28)
    col = normalised(A_3).sum(axis=0)
    expected = [np.array([0.5, 0.25, 0.25])] * 4
    for r in range(3):
        expected += [softmax((r + 1) * col)] * 8
    for step, plan in enumerate(plans):
        assert plan.counts is None, step
        assert plan.phase == ("prior" if step < 4 else "train"), step
        np.testing.assert_allclose(plan.weights, expected[step], rtol=1e-12, err_msg=str(step))
    assert [(c[0], c[4]) for c in branch_calls(signals)] == [(3, 1), (11, 2), (19, 3)]
    np.testing.assert_allclose(mixer.report()["A"], normalised(A_3), rtol=1e-12, atol=1e-15)
    # The domain with the largest column sum gains round after round.
    assert expected[-1][1] > expected[12][1] > expected[4][1] > 1 / 3


def test_state_round_trip_mid_round_gives_the_same_trajectory():
    opts = dict(round_steps=8, lp_rounds=2, lp_steps=1, variant="adaptive")
    straight = aioli(3, 28, batch=64, **opts)
    _, make_a, _ = law_world(A_3, 64)
    plans_a = drive(straight, make_a, 28)

    first = aioli(3, 28, batch=64, **opts)
    _, make_b, signals_b = law_world(A_3, 64)
    plans_b = drive(first, make_b, 13)  # killed mid-round 1
    resumed = aioli(3, 28, batch=64, **opts)
    resumed.load_state_dict(torch_roundtrip(first.state_dict()))
    plans_b += drive(resumed, make_b, 15, first=13)
    for a, b in zip(plans_a, plans_b, strict=True):
        np.testing.assert_array_equal(a.weights, b.weights)
    assert resumed.report() == straight.report()
    assert [c[4] for c in branch_calls(signals_b)] == [1, 2, 3, 4]


def test_a_skipped_step_before_a_round_moves_its_branches_to_the_next_step():
    mixer = aioli(3, 30, batch=64, round_steps=10, lp_rounds=1, lp_steps=1, variant="adaptive")
    _, make, signals = law_world(A_3, 64)
    plans = drive(mixer, make, 30, skip=frozenset({9}))
    assert [(c[0], c[4]) for c in branch_calls(signals)] == [(-1, 1), (10, 2), (19, 3)]
    col = normalised(A_3).sum(axis=0)
    np.testing.assert_allclose(plans[10].weights, softmax(col), rtol=1e-12)
    np.testing.assert_allclose(plans[11].weights, softmax(2 * col), rtol=1e-12)
    assert mixer.report()["rounds"] == 3 and mixer.report()["rounds_skipped"] == 0


def test_non_finite_branch_drops_keep_p():
    mixer = aioli(3, 30, batch=64, round_steps=10, lp_rounds=2, lp_steps=1)
    _, make, _ = law_world(A_3, 64, nan_probe=2)
    plans = drive(mixer, make, 30)
    for plan in plans:
        np.testing.assert_array_equal(plan.weights, np.full(3, 1 / 3))
    assert mixer.report()["rounds"] == 3 and mixer.report()["rounds_skipped"] == 3


def test_branch_rounds_need_no_room_for_in_place_probes():
    # 4 sweeps x 4 steps x 3 probes = 48 >= round_steps 20: refused in place, fine on branches.
    with pytest.raises(ConfigError, match="leaves no step"):
        build_mixer("aioli", {"round_steps": 20}, make_ctx(3, 100, 8))
    aioli(3, 100, round_steps=20)


def test_needs_for_follows_the_option():
    assert Aioli.needs == frozenset()
    assert Aioli.needs_for(Aioli.Config()) == frozenset()
    assert Aioli.needs_for(Aioli.Config(probes="branch")) == {"full_model", "branches"}
    with pytest.raises(ConfigError, match="not one of"):
        build_mixer("aioli", {"probes": "copies"}, make_ctx(3, 100, 8))


def test_a_driver_without_branches_refuses_branch_probes_only(tiny_data):
    from mixlab.train.session import MixingSession, RunView

    def cfg(probes: str):
        return load_config(
            None,
            [
                f"data.dir='{tiny_data}'",
                "data.seq_len=16",
                "train.batch_size=8",
                "mixer.name='aioli'",
                "mixer.options.round_steps=60",
                f"mixer.options.probes='{probes}'",
            ],
        )

    model = torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="needs copies of the model and its optimizer") as err:
        MixingSession(cfg("branch"), RunView(model=model, provides=frozenset({"full_model"})))
    assert "mixer.options.probes = 'train'" in str(err.value)
    with pytest.raises(ConfigError, match="unsharded parameters"):
        MixingSession(cfg("branch"), RunView(model=model, provides=frozenset()))
    session = MixingSession(cfg("train"), RunView(model=model, provides=frozenset()))
    assert session.mixer.config.probes == "train"


# ------------------------------------------------------------------------------ a real run


def test_tiny_run_trains_only_on_p_counts_extra_steps_and_resumes_exactly(
    tiny_data, tmp_path, monkeypatch
):
    """24 steps, rounds of 10 (branches at start() and after steps 9 and 19), 3 domains x
    2 sweeps x 1 step: 18 branch steps. Every batch of the run's own sampler (seed 0) is drawn
    from the logged weights, never from exact probe counts; the branch batches are exact probe
    batches, from a new stream (seed) for every branch of every round."""
    from mixlab.data.sampler import MixtureSampler

    drawn: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []
    next_batch = MixtureSampler.next_batch

    def recording(self, weights=None, counts=None):
        drawn.append(
            (
                self.seed,
                None if weights is None else np.array(weights),
                None if counts is None else np.array(counts),
            )
        )
        return next_batch(self, weights=weights, counts=counts)

    monkeypatch.setattr(MixtureSampler, "next_batch", recording)
    extra = [
        "mixer.name='aioli'",
        "mixer.options.probes='branch'",
        "mixer.options.round_steps=10",
        "mixer.options.lp_rounds=2",
        "mixer.options.lp_steps=1",
        "mixer.options.variant='adaptive'",
        "train.log_every=1",
        "checkpoint.every=5",
    ]
    full = assert_resume_identical(
        lambda: load_config(None, tiny_overrides(tiny_data, extra)), tmp_path, kill_after=13
    )
    assert full["extra_steps"] == 3 * 3 * 2 * 1

    # The full run drew first: 24 batches of its own and 18 branch batches.
    main = [d for d in drawn[:42] if d[0] == 0]
    branches = [d for d in drawn[:42] if d[0] != 0]
    assert len(main) == 24 and len(branches) == 18
    lines = [
        json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [[r["weights"][d] for d in "abc"] for r in lines if r["kind"] == "train"]
    assert len(logged) == 24
    for step, (_, weights, counts) in enumerate(main):
        assert counts is None, step
        np.testing.assert_allclose(weights, logged[step], rtol=1e-6, err_msg=str(step))
        np.testing.assert_array_equal(weights, main[10 * (step // 10)][1])  # p within a round
    assert not np.allclose(main[0][1], main[10][1])  # and p moves between rounds
    assert all(w is None and c is not None for _, w, c in branches)
    for _, _, counts in branches:
        assert counts.sum() == 8 and counts.max() == 5  # round(0.625 * 8) on the probed domain
    assert len({seed for seed, _, _ in branches}) == 18
