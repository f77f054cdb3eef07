"""Aioli: pure update rules against hand-computed values, the probe schedule, and recovery of A
on losses that follow the linear dynamic mixing law exactly."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from tests.mixers.fakes import DOMAINS, FakeSignals, LinearLawSim, drive, make_ctx

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.aioli import (
    aioli_update,
    ema_update,
    normalize_A,
    probe_mixture,
    probe_order,
    solve_A,
)


def aioli(m=2, total=100, batch=8, seed=0, **options):
    return build_mixer("aioli", options, make_ctx(m, total, batch, seed))


# ------------------------------------------------------------------------------ pure functions


def test_probe_mixture():
    np.testing.assert_array_equal(probe_mixture(3, 1, 0.625), [0.1875, 0.625, 0.1875])
    np.testing.assert_array_equal(probe_mixture(2, 0, 0.625), [0.625, 0.375])


def test_probe_order_is_seeded_permutations():
    order = probe_order(seed=0, round_index=0, m=4, lp_rounds=3)
    assert order.shape == (12,)
    for block in order.reshape(3, 4):
        assert sorted(block) == [0, 1, 2, 3]
    np.testing.assert_array_equal(order, probe_order(0, 0, 4, 3))
    assert not np.array_equal(order, probe_order(0, 1, 4, 3))
    assert not np.array_equal(order, probe_order(1, 0, 4, 3))


def test_solve_A_inverts_the_law():
    # B = A R^T: B[i, j] = sum_k A[i, k] R[j, k].
    R = np.array([[0.75, 0.25], [0.25, 0.75]])
    B = np.array([[1.75, 1.25], [1.125, 2.375]])
    np.testing.assert_allclose(solve_A(R, B), [[2.0, 1.0], [0.5, 3.0]], rtol=1e-14)


def test_solve_A_least_squares_when_probes_coincide():
    R = np.array([[0.5, 0.5], [0.5, 0.5]])
    B = np.array([[1.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(solve_A(R, B), [[1.0, 1.0], [2.0, 2.0]], rtol=1e-12)


def test_normalize_A():
    np.testing.assert_allclose(
        normalize_A(np.array([[1.0, -1.0], [2.0, 0.0]])), [[1 / 3, 0.0], [1 / 2, 1 / 6]], rtol=1e-15
    )
    np.testing.assert_allclose(
        normalize_A(np.array([[1.0, 2.0], [3.0, 4.0]])), [[0.1, 0.2], [0.3, 0.4]], rtol=1e-15
    )
    np.testing.assert_array_equal(normalize_A(np.zeros((2, 2))), np.zeros((2, 2)))
    np.testing.assert_array_equal(normalize_A(np.full((2, 2), -3.0)), np.zeros((2, 2)))


def test_ema_update():
    prev, new = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(ema_update(prev, new, 0.1), [[0.1, 0.9], [0.9, 0.1]], rtol=1e-15)
    np.testing.assert_array_equal(ema_update(None, new, 0.1), new)
    np.testing.assert_array_equal(ema_update(prev, new, 0.0), new)


def test_aioli_update():
    A = np.array([[1 / 3, 0.0], [1 / 2, 1 / 6]])  # column sums 5/6, 1/6
    p = aioli_update(np.array([0.5, 0.5]), A, eta=0.2)
    first = 1.0 / (1.0 + math.exp(-0.2 * (5 / 6 - 1 / 6)))
    np.testing.assert_allclose(p, [first, 1 - first], rtol=1e-14)
    p = aioli_update(np.array([0.2, 0.8]), A, eta=1.0)
    e0, e1 = 0.2 * math.exp(5 / 6), 0.8 * math.exp(1 / 6)
    np.testing.assert_allclose(p, [e0 / (e0 + e1), e1 / (e0 + e1)], rtol=1e-14)
    # A domain at 0 stays at 0; huge exponents stay finite.
    np.testing.assert_array_equal(aioli_update(np.array([0.0, 1.0]), A, 5.0), [0.0, 1.0])
    np.testing.assert_array_equal(
        aioli_update(np.array([0.5, 0.5]), np.array([[1e30, 0], [0, 0]]), 1.0), [1.0, 0.0]
    )


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "m, batch, options, message",
    [
        (3, 8, {"round_steps": 48}, "4 * 4 * 3 = 48"),
        (3, 8, {"one_hot_factor": 0.3}, "above 1/m"),
        (2, 8, {"prior": {"a": 1, "b": 1}, "prior_run": "x"}, "not both"),
        (1, 8, {}, "at least 2 domains"),
        (3, 8, {"floor": 0.4}, "above 1/m"),
        (2, 8, {"prior_steps": 100}, "no dynamic step"),
        # Probes [1, 1, 0, 0] and its rotations: the circulant's eigenvalue 1 + (-1) is 0.
        (4, 2, {"one_hot_factor": 0.5, "lp_rounds": 1}, "not linearly independent"),
        (2, 8, {"ema": 1.0}, "ema must be"),
        (2, 8, {"lp_steps": 0}, "lp_steps must be"),
        (2, 8, {"anchor": "prior"}, "not one of"),
        (2, 8, {"variant": "paper"}, "not one of"),
        (2, 8, {"round_step": 10}, "Did you mean 'round_steps'"),
        (2, 8, {"prior": {"a": 1}}, "missing domain"),
    ],
)
def test_config_errors_say_what_to_change(m, batch, options, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        build_mixer("aioli", options, make_ctx(m, 100, batch))


# ------------------------------------------------------------------------------ probes


def test_probe_batches_are_exact_for_7_domains_and_batch_8():
    """The public code's defect: its probe batches did not match P_j. Ours are counts/8 exactly."""
    mixer = aioli(m=7, batch=8, round_steps=10, lp_rounds=1, lp_steps=1, one_hot_factor=0.625)
    plans = [mixer.plan(s) for s in range(7)]
    probed = []
    for plan in plans:
        assert plan.phase == "probe"
        counts = np.asarray(plan.counts)
        assert counts.sum() == 8
        np.testing.assert_array_equal(plan.weights, counts / 8)
        j = int(np.argmax(counts))
        probed.append(j)
        assert counts[j] == 5 and plan.weights[j] == 0.625
        assert sorted(np.delete(counts, j).tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(probed) == list(range(7))
    assert mixer.plan(7).phase == "train" and mixer.plan(7).counts is None


def test_schedule_and_eval_requests():
    """prior 3 steps, then rounds of 10: 4 probe steps (2 domains x 2 sweeps x 1 step), 6 train."""
    mixer = aioli(m=2, total=30, prior_steps=3, round_steps=10, lp_rounds=2, lp_steps=1)
    asked: list[int] = []

    def signals(step, plan):
        return FakeSignals(step, eval=np.array([5.0 - 0.01 * step, 4.0]), counts=np.zeros(2))

    for step in range(30):
        phase = mixer.plan(step).phase
        expected = "prior" if step < 3 else "probe" if (step - 3) % 10 < 4 else "train"
        assert phase == expected, step
        sig = signals(step, None)
        mixer.observe(step, sig)
        asked += [step] * sig.calls.count("eval_losses")
    # One eval before each round's probes and one after each probe; none elsewhere.
    assert asked == [2, 3, 4, 5, 6, 12, 13, 14, 15, 16, 22, 23, 24, 25, 26]
    assert mixer.report()["rounds"] == 3


# ------------------------------------------------------------------------------ the linear law

A_2 = np.array([[0.4, 0.0], [0.2, 0.8]])


def run_law(mixer, A, steps, L0=100.0, batch=4, **kw):
    sim = LinearLawSim(A, np.full(A.shape[0], L0), batch, **kw)
    plans = drive(mixer, sim, steps)
    return sim, plans


@pytest.mark.parametrize("anchor", ["initial", "previous"])
def test_two_rounds_hand_computed(anchor):
    """c = 0.75 with batch 4 probes exactly [3, 1]/4 and [1, 3]/4.

    Drops: A q0 = [0.3, 0.35], A q1 = [0.1, 0.65] -> solve gives A exactly; normalised
    A_n = [[2/7, 0], [1/7, 4/7]] (column sums 3/7, 4/7); the EMA of equal matrices is A_n.
    """
    mixer = aioli(
        m=2,
        total=12,
        batch=4,
        round_steps=6,
        lp_rounds=2,
        lp_steps=1,
        one_hot_factor=0.75,
        eta=0.5,
        ema=0.5,
        anchor=anchor,
    )
    sim = LinearLawSim(A_2, np.full(2, 100.0), 4)
    plans = drive(mixer, sim, 6)
    first = 1.0 / (1.0 + math.exp(-0.5 * (4 / 7 - 3 / 7)))  # weight of domain 1
    np.testing.assert_allclose(plans[4].weights, [1 - first, first], rtol=1e-12)
    np.testing.assert_allclose(mixer.report()["A_raw"], A_2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        mixer.report()["A"], [[2 / 7, 0.0], [1 / 7, 4 / 7]], rtol=1e-12, atol=1e-12
    )

    plans += drive(mixer, sim, 6, first=6)
    second = first if anchor == "initial" else 1.0 / (1.0 + math.exp(-1.0 * (4 / 7 - 3 / 7)))
    np.testing.assert_allclose(plans[10].weights, [1 - second, second], rtol=1e-12)
    assert mixer.report()["rounds"] == 2 and mixer.report()["rounds_skipped"] == 0


def test_recovers_A_exactly_with_realised_probe_mixtures():
    """m = 7, batch 8: the realised probes differ from P_j, and only they give back A."""
    rng = np.random.default_rng(0)
    A = rng.uniform(-0.2, 1.0, size=(7, 7))
    mixer = aioli(
        m=7, batch=8, total=60, round_steps=30, lp_rounds=1, lp_steps=2, normalize=False, ema=0.0
    )
    run_law(mixer, A, 15, batch=8)
    est = np.asarray(mixer.report()["A_raw"]) / 2  # drops span lp_steps = 2 steps
    np.testing.assert_allclose(est, A, rtol=1e-9, atol=1e-10)
    # Solving with the idealised P_j instead (as if the batches were exact) is badly off.
    ideal = np.stack([probe_mixture(7, j, 0.625) for j in range(7)])
    B = 2 * A @ mixer.realised.T
    assert np.max(np.abs(solve_A(ideal, B) / 2 - A)) > 0.1


def test_recovers_A_within_tolerance_under_noise():
    """Eval noise σ = 1e-3 with the published 4 sweeps x 4 steps: |Â - A| < 0.005 everywhere.

    Each drop carries noise σ√2, averaged over 4 sweeps and divided by the 4 steps it spans,
    then multiplied by R^{-1}: about 5e-4 (seeds 0-4 give 3e-4 to 8e-4)."""
    A = np.array([[0.5, 0.1, -0.05], [0.2, 0.6, 0.1], [0.0, 0.3, 0.4]])
    mixer = aioli(m=3, batch=64, total=250, normalize=False, ema=0.0)
    run_law(mixer, A, 48, batch=64, noise=1e-3, seed=4)
    est = np.asarray(mixer.report()["A_raw"]) / 4
    assert np.max(np.abs(est - A)) < 0.005


A_3 = np.array([[0.1, 0.5, 0.2], [0.1, 0.4, 0.1], [0.1, 0.3, 0.3]])  # column sums .3, 1.2, .6


def test_mixture_moves_toward_the_laws_optimum():
    """Under the law the total loss falls fastest on the domain with the largest column sum."""
    mixer = aioli(
        m=3,
        batch=64,
        total=400,
        round_steps=40,
        lp_rounds=1,
        lp_steps=2,
        eta=1.0,
        anchor="previous",
    )
    p_after_round = []
    sim = LinearLawSim(A_3, np.full(3, 100.0), 64)
    drive(mixer, sim, 0)
    for r in range(8):
        drive(mixer, sim, 40, first=40 * r, start=r == 0)
        p_after_round.append(mixer.report()["p"][1])
    assert all(b > a for a, b in itertools.pairwise(p_after_round))
    assert p_after_round[-1] > 0.8
    # Same steps on the uniform mixture lose less loss.
    uniform_final = 100.0 - 320 * A_3 @ np.full(3, 1 / 3)
    assert sim.L.mean() < uniform_final.mean() - 10


def test_default_anchor_stays_within_exp_eta_of_p0():
    mixer = aioli(m=3, batch=64, total=400, round_steps=40, lp_rounds=1, lp_steps=2, eta=1.0)
    run_law(mixer, A_3, 200, batch=64)
    p = np.asarray(mixer.report()["p"])
    assert int(np.argmax(p)) == 1 and p[1] > 1 / 3
    assert p.max() / p.min() <= math.e + 1e-12


# ------------------------------------------------------------------------------ restricted, robustness


def test_prior_phase_and_anchor(tmp_path):
    mixer = aioli(
        m=2,
        prior={"a": 3, "b": 1},
        prior_steps=5,
        round_steps=10,
        lp_rounds=1,
        lp_steps=1,
        one_hot_factor=0.75,
        batch=4,
        eta=0.5,
    )
    for s in range(5):
        plan = mixer.plan(s)
        assert plan.phase == "prior"
        np.testing.assert_array_equal(plan.weights, [0.75, 0.25])
    assert mixer.plan(5).phase == "probe"
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"weights_final": {"a": 0.2, "b": 0.6}}))
    from_run = aioli(m=2, prior_run=str(run), prior_steps=2)
    np.testing.assert_allclose(from_run.plan(0).weights, [0.25, 0.75], rtol=1e-15)
    _, plans = run_law(mixer, A_2, 9, batch=4)
    # Published: the prior is forgotten after the prior phase, p ∝ exp(0.5 * [3/7, 4/7]).
    first = 1.0 / (1.0 + math.exp(-0.5 * (4 / 7 - 3 / 7)))
    np.testing.assert_allclose(plans[7].weights, [1 - first, first], rtol=1e-12)
    # keep_prior: the update multiplies the prior, p ∝ [0.75, 0.25] * exp(0.5 * [3/7, 4/7]).
    kept = aioli(
        m=2, prior={"a": 3, "b": 1}, prior_steps=5, round_steps=10, lp_rounds=1, lp_steps=1,
        one_hot_factor=0.75, batch=4, eta=0.5, keep_prior=True,
    )
    _, plans = run_law(kept, A_2, 9, batch=4)
    e0, e1 = 0.75 * math.exp(0.5 * 3 / 7), 0.25 * math.exp(0.5 * 4 / 7)
    np.testing.assert_allclose(plans[7].weights, [e0 / (e0 + e1), e1 / (e0 + e1)], rtol=1e-12)
    with pytest.raises(ConfigError, match=r"no summary\.json"):
        aioli(m=2, prior_run=str(tmp_path / "missing"))


def test_first_probe_baseline_comes_from_start():
    options = dict(m=2, batch=4, round_steps=6, lp_rounds=1, lp_steps=1, one_hot_factor=0.75)
    with_start = aioli(**options)
    run_law(with_start, A_2, 6, batch=4)
    assert with_start.report()["rounds_skipped"] == 0
    without = aioli(**options)
    drive(without, LinearLawSim(A_2, np.full(2, 100.0), 4), 6, start=False)
    assert without.report()["rounds_skipped"] == 1
    np.testing.assert_array_equal(without.report()["p"], [0.5, 0.5])


def test_unobserved_probe_end_drops_only_that_measurement():
    """A non-finite last probe step loses that repeat (and the round is finished at the next
    observed step); the other repeat of the same probe still gives A."""
    options = dict(
        m=2,
        batch=4,
        total=20,
        round_steps=10,
        lp_rounds=2,
        lp_steps=2,
        one_hot_factor=0.75,
        normalize=False,
        ema=0.0,
    )
    full, skipped = aioli(**options), aioli(**options)
    drive(full, LinearLawSim(A_2, np.full(2, 100.0), 4), 10)
    drive(skipped, LinearLawSim(A_2, np.full(2, 100.0), 4), 10, skip=frozenset({7}))
    np.testing.assert_allclose(skipped.report()["A_raw"], full.report()["A_raw"], rtol=1e-12)
    np.testing.assert_allclose(skipped.report()["p"], full.report()["p"], rtol=1e-12)
    # With one sweep the lost probe leaves A unsolvable: the round keeps p.
    one = aioli(**{**options, "lp_rounds": 1})
    drive(one, LinearLawSim(A_2, np.full(2, 100.0), 4), 10, skip=frozenset({3}))
    assert one.report()["rounds_skipped"] == 1


def test_plan_after_the_run_is_the_learned_mixture():
    mixer = aioli(
        m=2, total=12, batch=4, round_steps=6, lp_rounds=2, lp_steps=1, one_hot_factor=0.75
    )
    run_law(mixer, A_2, 12, batch=4)
    final = mixer.plan(12)  # step 12 would start round 2's probes
    assert final.counts is None and final.phase == "train"
    np.testing.assert_array_equal(final.weights, mixer.report()["p"])


# ------------------------------------------------------------------------------ issue 13


def probe_plans(mixer, m, lp_rounds, lp_steps=1):
    """(sweep, probed domain, counts) of every probe step of round 0, in step order."""
    out = []
    for step in range(lp_rounds * m * lp_steps):
        plan = mixer.plan(step)
        assert plan.phase == "probe"
        counts = np.asarray(plan.counts)
        out.append((step // (m * lp_steps), int(np.argmax(counts)), counts))
    return out


# Hand-derived probe batches of sweeps 0-3 for probe j (offsets from j, mod m). m = 7, c = 0.75,
# batch 8: 8 * 0.75 = 6 on j, 8 * 0.25 / 6 = 1/3 on the others, so floor 0 and 2 leftovers: they
# go to j+1, j+2 (sweep 0), j-1, j-2 (sweep 1), then shifted one place: j+2, j+3 and j-2, j-3.
# m = 3, c = 0.625, batch 8: 5 on j, 1.5 on each other, so [2, 1] on (j+1, j+2), then
# (j-1, j-2) = (j+2, j+1), then shifted [1, 2] on (j+1, j+2), then on (j-1, j-2).
HAND_PROBES = {
    (7, 0.75, 8): [{0: 6, 1: 1, 2: 1}, {0: 6, -1: 1, -2: 1}, {0: 6, 2: 1, 3: 1}, {0: 6, -2: 1, -3: 1}],
    (3, 0.625, 8): [{0: 5, 1: 2, 2: 1}, {0: 5, 2: 2, 1: 1}, {0: 5, 1: 1, 2: 2}, {0: 5, 2: 1, 1: 2}],
}


@pytest.mark.parametrize("m, c, batch", list(HAND_PROBES))
def test_probe_batches_match_the_hand_derivation(m, c, batch):
    mixer = aioli(m=m, batch=batch, total=200, round_steps=100, lp_rounds=4, lp_steps=1,
                  one_hot_factor=c)
    for sweep, j, counts in probe_plans(mixer, m, 4):
        want = np.zeros(m, dtype=np.int64)
        for offset, n in HAND_PROBES[m, c, batch][sweep].items():
            want[(j + offset) % m] += n
        np.testing.assert_array_equal(counts, want, err_msg=f"sweep {sweep}, probe {j}")


@pytest.mark.parametrize(
    "m, c, batch, lp_rounds",
    [(7, 0.75, 8, 1), (7, 0.75, 8, 4), (3, 0.625, 8, 1), (3, 0.625, 8, 4), (5, 0.5, 7, 3),
     (4, 0.6, 10, 2), (6, 0.4, 9, 1), (2, 0.625, 8, 4)],
)
def test_probe_round_trains_every_domain_equally(m, c, batch, lp_rounds):
    """Finding 2 of issue 13. A sweep has m probes of ``batch`` samples, and each domain is
    probed once and is a non-probed domain of the other m - 1 probes at every distance from
    them once, so it gets exactly ``batch`` samples per sweep: the round totals are
    lp_rounds * lp_steps * batch for every domain, the most balanced integer split. With the
    domains listed in reverse order, the totals per domain name are the same (equivalently,
    the totals by index are reversed). Counts are integers: exact equality."""
    by_name = []
    for order in (DOMAINS[:m], DOMAINS[:m][::-1]):
        ctx = dataclasses.replace(make_ctx(m, 400, batch), domains=list(order))
        options = dict(round_steps=200, lp_rounds=lp_rounds, lp_steps=2, one_hot_factor=c)
        mixer = build_mixer("aioli", options, ctx)
        plans = probe_plans(mixer, m, lp_rounds, lp_steps=2)
        total = np.sum([counts for _, _, counts in plans], axis=0)
        np.testing.assert_array_equal(total, np.full(m, lp_rounds * 2 * batch))
        by_name.append(dict(zip(order, total.tolist())))
    assert by_name[0] == by_name[1]


def test_mean_probe_composition_is_symmetric_about_the_probed_domain():
    """Even sweeps place leftovers after j, odd ones before: over 4 sweeps (m = 7, c = 0.75,
    batch 8, HAND_PROBES) probe 0 has 6 on itself and, at distances 1, 2, 3 either side,
    1/4, 2/4, 1/4 of a sample, so reversing the domains maps each probe's mean onto the mirror
    probe's. Sums of quarters of small integers: exact in float."""
    mixer = aioli(m=7, batch=8, total=400, round_steps=200, lp_rounds=4, lp_steps=1,
                  one_hot_factor=0.75)
    mean = np.zeros((7, 7))
    for _, j, counts in probe_plans(mixer, 7, 4):
        mean[j] += counts / 4
    want = np.array([6, 0.25, 0.5, 0.25, 0.25, 0.5, 0.25])
    for j in range(7):
        np.testing.assert_array_equal(mean[j], np.roll(want, j))
    np.testing.assert_array_equal(mixer.realised, mean / 8)


def test_result_in_a_linear_world_does_not_depend_on_domain_order():
    """Finding 2 of issue 13: m = 7, batch 8, c = 0.75 (the issue's case), the published
    4 sweeps x 4 steps, 3 rounds. Reversing the domains (A -> J A J, L0 -> J L0) must reverse
    the final weights and the final losses. Before the fix the probe steps trained
    [.214 .214 .143 .107 ...] in both orders, so the losses were not reversed.

    Tolerance: L starts at 100 (ulp 1.4e-14) and takes 750 steps of O(1) updates, so rounding
    accumulates to < 750 * 1.4e-14 ≈ 1e-11; A comes from drops of O(1) measured on values near
    100 (relative error ~1e-14, times cond(R) < 10), and p = softmax(eta * column sums): far
    below 1e-10. The order-dependence the old probe batches caused is of order 1 in L here."""
    rng = np.random.default_rng(13)
    A = rng.uniform(-0.05, 0.1, size=(7, 7)) + np.diag(rng.uniform(0.1, 0.4, 7))
    L0 = 100.0 + rng.uniform(0.0, 5.0, 7)
    results = []
    for J in (np.arange(7), np.arange(7)[::-1]):
        mixer = aioli(m=7, batch=8, total=750, round_steps=250, one_hot_factor=0.75,
                      anchor="previous", eta=1.0)
        sim = LinearLawSim(A[np.ix_(J, J)], L0[J], 8)
        drive(mixer, sim, 750)
        results.append((np.asarray(mixer.report()["p"]), sim.L))
    (p, L), (p_rev, L_rev) = results
    assert np.abs(p - 1 / 7).max() > 0.01  # the mixture did move
    np.testing.assert_allclose(p_rev, p[::-1], rtol=0, atol=1e-10)
    np.testing.assert_allclose(L_rev, L[::-1], rtol=0, atol=1e-10)


def test_restricted_setting_leaves_a_bad_prior():
    """Finding 3 of issue 13. Linear law with A_3 (column sums .3, 1.2, .6: domain 0 helps the
    average loss least) and the prior [.9 .05 .05] trained for 50 steps. Published
    (trainer/aioli_trainer.py:231): the update after the prior phase starts from uniform, so
    after the first round p = softmax(eta * column sums of the normalised A), computed here
    from A_3 by hand: A_3 >= 0, sum 2.1, column sums [1/7, 4/7, 2/7]. The mixture leaves the
    prior in the direction A gives (domain 1 up, domain 0 down).

    The law is exact and A is recovered to ~1e-14 relative (drops of O(1) on losses near 100),
    which the softmax keeps: rtol 1e-12."""
    prior = {"a": 0.9, "b": 0.05, "c": 0.05}
    mixer = aioli(m=3, batch=64, total=400, prior=prior, prior_steps=50, round_steps=40,
                  lp_rounds=1, lp_steps=2, eta=1.0)
    sim = LinearLawSim(A_3, np.full(3, 100.0), 64)
    plans = drive(mixer, sim, 50 + 40)
    np.testing.assert_allclose(plans[0].weights, [0.9, 0.05, 0.05], rtol=1e-15)
    colsum = np.array([1, 4, 2]) / 7
    want = np.exp(colsum) / np.exp(colsum).sum()
    np.testing.assert_allclose(mixer.report()["p"], want, rtol=1e-12)
    assert want[0] < 1 / 3 < want[1] and np.argmax(want) == 1  # left the prior
    # Over the rest of the run the mixture stays away from the prior, and the average loss ends
    # lower than if the prior had been kept (keep_prior: p within a factor e of the prior).
    drive(mixer, sim, 400 - 90, first=90)
    kept = aioli(m=3, batch=64, total=400, prior=prior, prior_steps=50, round_steps=40,
                 lp_rounds=1, lp_steps=2, eta=1.0, keep_prior=True)
    kept_sim = LinearLawSim(A_3, np.full(3, 100.0), 64)
    drive(kept, kept_sim, 400)
    p_kept = np.asarray(kept.report()["p"])
    w = 0.9 * math.exp(1 / 7)
    assert p_kept[0] >= w / (w + 0.1 * math.exp(4 / 7)) - 1e-12  # bound from exp(eta) factor
    assert mixer.report()["p"][0] < 1 / 3 and sim.L.mean() < kept_sim.L.mean() - 1.0


def test_restricted_adaptive_keeps_moving_away_from_the_prior():
    """The adaptive variant ("previous" anchor) starts from uniform after the prior phase and
    multiplies in exp(eta * column sums) every round: after r rounds of the exact law
    p ∝ exp(r * [1/7, 4/7, 2/7]) (A_3 normalised, the EMA of equal matrices is that matrix).
    Tolerance as in test_restricted_setting_leaves_a_bad_prior, over 4 rounds: rtol 1e-12."""
    mixer = aioli(m=3, batch=64, total=400, prior={"a": 0.9, "b": 0.05, "c": 0.05},
                  prior_steps=50, round_steps=40, lp_rounds=1, lp_steps=2, variant="adaptive")
    assert (mixer.config.anchor, mixer.config.eta, mixer.config.keep_prior) == (
        "previous", 1.0, False)
    sim = LinearLawSim(A_3, np.full(3, 100.0), 64)
    drive(mixer, sim, 50)
    for r in range(1, 5):
        drive(mixer, sim, 40, first=50 + 40 * (r - 1))
        logits = r * np.array([1, 4, 2]) / 7
        np.testing.assert_allclose(
            mixer.report()["p"], np.exp(logits) / np.exp(logits).sum(), rtol=1e-12
        )


def test_variant_presets_and_explicit_options():
    published = aioli(m=3, round_steps=100)
    assert (published.config.variant, published.config.anchor, published.config.eta) == (
        "published", "initial", 0.2)
    assert published.config.ema == 0.1 and published.config.normalize is True
    mixed = aioli(m=3, round_steps=100, variant="adaptive", eta=0.5)
    assert (mixed.config.anchor, mixed.config.eta) == ("previous", 0.5)
    # keep_prior follows prior_steps unless given.
    assert aioli(m=2, prior={"a": 1, "b": 3}).config.keep_prior is True
    assert aioli(m=2, prior={"a": 1, "b": 3}, prior_steps=5).config.keep_prior is False
    assert aioli(m=2, prior_steps=5, keep_prior=True).config.keep_prior is True


def reference_rounds(readings, plans, observed, m, batch, lp_rounds, lp_steps, round_steps,
                     eta, ema, anchor):
    """Aioli's rounds re-implemented from the paper / reference (trainer/aioli_trainer.py:
    119-190, 324-345) on the readings the mixer saw: B[:, j] = mean drop over probe j's measured
    repeats, R[j] = mean composition of those repeats, A_i = R^{-1} B_i, shift to >= 0 and
    divide by the sum, EMA, then p_j ∝ base_j exp(eta sum_i A_ij). Returns p after each round."""
    ps, p, A_bar = [], np.full(m, 1 / m), None
    n_rounds = len(plans) // round_steps
    for r in range(n_rounds):
        B, R, n = np.zeros((m, m)), np.zeros((m, m)), np.zeros(m)
        for slot in range(lp_rounds * m):
            s0 = r * round_steps + slot * lp_steps
            end = s0 + lp_steps - 1
            if (s0 - 1) in observed and end in observed:
                counts = np.asarray(plans[s0].counts)
                j = int(np.argmax(counts))
                B[:, j] += readings[s0 - 1] - readings[end]
                R[j] += counts / batch
                n[j] += 1
        B, R = B / n, R / n[:, None]
        A = np.stack([np.linalg.solve(R, B[i]) for i in range(m)])
        A = A - min(A.min(), 0.0)
        A = A / A.sum()
        A_bar = A if A_bar is None else (1 - ema) * A + ema * A_bar
        base = np.full(m, 1 / m) if anchor == "initial" or r == 0 else p
        p = base * np.exp(eta * A_bar.sum(axis=0))
        p = p / p.sum()
        ps.append(p)
    return ps


@pytest.mark.parametrize("anchor", ["initial", "previous"])
def test_rounds_match_a_numpy_reimplementation(anchor):
    """The A estimate and update against reference_rounds, on a noisy linear law (so that A,
    B and every EMA differ from round to round) with one probe end unobserved (step 21, round 1:
    that repeat and the next probe, whose "before" reading is then missing, drop out, and R
    uses only the measured repeats). Same float operations in a different order: solve vs
    solve, sums of 4 terms; rtol 1e-9 leaves room for cond(R) ~ 10 times the noise-driven
    cancellation in B (drops ~0.5 measured against readings ~100)."""
    m, batch, lp_rounds, lp_steps, U = 3, 8, 2, 2, 20
    mixer = aioli(m=m, batch=batch, total=60, round_steps=U, lp_rounds=lp_rounds,
                  lp_steps=lp_steps, eta=0.7, ema=0.3, anchor=anchor)
    sim = LinearLawSim(A_3, np.full(m, 100.0), batch, noise=0.05, seed=2)
    readings, observed = {}, {-1}
    skip = frozenset({21})

    def signals(step, plan):
        sig = sim(step, plan)
        readings[step] = sig.eval
        if step >= 0 and step not in skip:
            observed.add(step)
        return sig

    ps = []
    plans = []
    for r in range(3):
        plans += drive(mixer, signals, U, first=U * r, skip=skip)
        ps.append(np.asarray(mixer.report()["p"]))
    want = reference_rounds(readings, plans, observed, m, batch, lp_rounds, lp_steps, U, 0.7,
                            0.3, anchor)
    assert mixer.report()["rounds_skipped"] == 0
    np.testing.assert_allclose(ps, want, rtol=1e-9)
    assert np.abs(np.diff(ps, axis=0)).max() > 1e-3  # the rounds did differ


def test_checkpoint_from_before_the_balanced_probes_is_refused():
    mixer = aioli(m=2, round_steps=10, lp_rounds=1, lp_steps=1)
    state = mixer.state_dict()
    del state["R_sum"]
    with pytest.raises(CheckpointError, match="restart the run"):
        aioli(m=2, round_steps=10, lp_rounds=1, lp_steps=1).load_state_dict(state)
