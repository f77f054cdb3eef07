"""DoReMi: the excess-loss update against hand-computed values, averaging, sampling modes, and
the per-token clip of the reference (sangmichaelxie/doremi ``doremi/trainer.py:252``)."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.mixers.fakes import FakeSignals, make_ctx

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.doremi import clipped_token_excess, doremi_update, excess_losses, running_mean

NAN = float("nan")


def doremi(m=2, total=10, **options):
    return build_mixer("doremi", options, make_ctx(m, total))


def sig(step, counts, train, ref):
    """Signals of a batch whose per-token excess never changes sign within a domain, so the
    per-token clip (``excess_losses``, the default) and the clip of the domain means agree:
    max(train - ref, 0), written out with numpy."""
    train, ref = np.array(train), np.array(ref)
    with np.errstate(invalid="ignore"):
        excess = np.where(np.isnan(train - ref), np.nan, np.maximum(train - ref, 0.0))
    return FakeSignals(step, counts=np.array(counts), train=train, reference=ref, excess=excess)


def smooth(a, eps=1e-3):
    a = np.asarray(a)
    return (1 - eps) * a + eps / a.size


def test_excess_losses_clip_at_zero_and_keep_nan():
    np.testing.assert_array_equal(excess_losses([3.0, 2.0, NAN], [2.5, 2.5, 1.0]), [0.5, 0.0, NAN])


def test_doremi_update():
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    np.testing.assert_allclose(
        doremi_update(np.array([0.5, 0.5]), np.array([0.5, 0.0]), 1.0, 1e-3),
        smooth([sigma, 1 - sigma]),
        rtol=1e-15,
    )
    # A step of eta=2 on [0.2, 0.8] with scores [1, 0].
    e0, e1 = 0.2 * math.exp(2.0), 0.8
    np.testing.assert_allclose(
        doremi_update(np.array([0.2, 0.8]), np.array([1.0, 0.0]), 2.0, 0.01),
        smooth([e0 / (e0 + e1), e1 / (e0 + e1)], 0.01),
        rtol=1e-15,
    )
    # Huge scores: one-hot, then the smoothing floor eps/m.
    np.testing.assert_allclose(
        doremi_update(np.array([0.5, 0.5]), np.array([1e30, 0.0]), 1.0, 1e-3),
        [0.9995, 0.0005],
        rtol=1e-15,
    )


def test_running_mean():
    np.testing.assert_allclose(
        running_mean(np.array([0.2, 0.8]), np.array([0.6, 0.4]), 2), [0.4, 0.6]
    )


def test_two_steps_hand_computed_absent_domain_keeps_its_score():
    mixer = doremi()
    np.testing.assert_array_equal(mixer.plan(0).weights, [0.5, 0.5])
    np.testing.assert_array_equal(mixer.plan(0).loss_weights, [0.5, 0.5])
    s0 = sig(0, [4, 4], [3.0, 2.0], [2.5, 2.5])
    mixer.observe(0, s0)
    assert sorted(set(s0.calls)) == ["excess_losses", "train_counts"]
    s0 = sig(0, [4, 4], [3.0, 2.0], [2.5, 2.5])
    doremi(clip="domain").observe(0, s0)
    assert sorted(set(s0.calls)) == ["reference_losses", "train_counts", "train_losses"]
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    a1 = smooth([sigma, 1 - sigma])
    np.testing.assert_allclose(mixer.plan(1).loss_weights, a1, rtol=1e-15)
    np.testing.assert_array_equal(mixer.plan(1).weights, [0.5, 0.5])
    # Domain 0 absent: its score stays 0.5; domain 1's excess is 1.0.
    mixer.observe(1, sig(1, [0, 8], [NAN, 3.0], [NAN, 2.0]))
    e = a1 * np.exp([0.5, 1.0])
    a2 = smooth(e / e.sum())
    np.testing.assert_allclose(mixer.plan(2).loss_weights, a2, rtol=1e-14)
    np.testing.assert_allclose(mixer.report()["excess"], [0.5, 1.0])
    # The proxy's output is the average of alpha over the updates.
    np.testing.assert_allclose(mixer.plan(10).weights, (a1 + a2) / 2, rtol=1e-14)
    np.testing.assert_allclose(mixer.report()["alpha_avg"], (a1 + a2) / 2, rtol=1e-14)


def test_update_every_averages_the_excess_over_samples():
    mixer = doremi(update_every=2)
    mixer.observe(0, sig(0, [2, 6], [3.0, 2.0], [2.5, 2.5]))  # excess [0.5, 0]
    np.testing.assert_array_equal(mixer.plan(1).loss_weights, [0.5, 0.5])
    mixer.observe(1, sig(1, [6, 2], [3.5, 3.0], [2.5, 2.5]))  # excess [1.0, 0.5]
    s = np.array([(2 * 0.5 + 6 * 1.0) / 8, (6 * 0.0 + 2 * 0.5) / 8])
    e = np.exp(s)
    np.testing.assert_allclose(mixer.plan(2).loss_weights, smooth(e / e.sum()), rtol=1e-15)


def test_sampling_by_alpha():
    mixer = doremi(sampling="alpha")
    mixer.observe(0, sig(0, [4, 4], [3.0, 2.0], [2.5, 2.5]))
    plan = mixer.plan(1)
    assert plan.loss_weights is None
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    np.testing.assert_allclose(plan.weights, smooth([sigma, 1 - sigma]), rtol=1e-15)


def test_alpha_never_falls_below_eps_over_m():
    mixer = doremi(m=3, total=100, eps=0.03)
    rng = np.random.default_rng(0)
    for step in range(50):
        train = rng.choice([0.0, 1e-30, 1e30], size=3)
        mixer.observe(step, sig(step, [3, 3, 2], train, [0.0, 0.0, 0.0]))
        assert np.min(mixer.plan(step + 1).loss_weights) >= 0.01 - 1e-15


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eps": 2.0}, "eps must be"),
        ({"update_every": 0}, "update_every"),
        ({"sampling": "proxy"}, "not one of"),
        ({"eta": -1.0}, "eta must be"),
        ({"clip": "sample"}, "not one of"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        doremi(**options)


# ---------------------------------------------------------------------------------------------
# Per-token clipping (issue 13, finding 5), through the trainer's signals.


def test_clipped_token_excess_by_hand():
    proxy = np.array([[3.0, 1.0, 2.0, 2.0], [1.0, 1.0, NAN, 1.0]])
    ref = np.array([[1.0, 2.0, 2.0, 1.5], [0.0, 0.0, 0.0, 0.0]])
    got = clipped_token_excess(proxy, ref)
    assert got[0] == (2.0 + 0.0 + 0.0 + 0.5) / 4
    assert np.isnan(got[1])


class _UniformLogits(torch.nn.Module):
    """A "reference model" whose logits are all 0: every token's loss is exactly ln V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab) + 0.0 * self.anchor


V, T = 8, 4
# Per-token excess of the proxy over the reference (ℓ_ref = ln V everywhere), one row per sample:
# domain 0 is much worse on half its tokens and as much better on the other half (mean excess
# 0), domain 1 is a little worse on every token.
DIFFS = {0: [2.0, -2.0, 2.0, -2.0], 1: [0.5, 0.5, 0.5, 0.5]}
DOMAINS = np.array([0, 1, 1, 0])


def _step_signals(step):
    """The trainer's StepSignals for a batch of 4 windows, the proxy's per-token losses given
    (as the training forward gives them), the reference model above."""
    from mixlab.train.distributed import DistInfo
    from mixlab.train.signals import StepSignals

    tokens = torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(step))
    proxy = torch.tensor([[math.log(V) + d for d in DIFFS[int(k)]] for k in DOMAINS])
    trainer = SimpleNamespace(m=2, reference=_UniformLogits(V), device=torch.device("cpu"),
                              autocast=contextlib.nullcontext, dist=DistInfo(), model=None,
                              cfg=SimpleNamespace(mixer=SimpleNamespace(name="doremi")),
                              # The per-sample losses of that reference (clip = "domain").
                              reference_sample_losses=lambda x: np.full(x.shape[0], math.log(V)))
    return StepSignals(step, trainer, proxy.mean(dim=1).numpy(), DOMAINS, tokens,
                       token_losses=proxy)


def test_excess_losses_clip_every_token_then_average():
    got = _step_signals(0).excess_losses()
    # By hand: domain 0: (2 + 0 + 2 + 0) / 4 = 1 per sample; domain 1: 0.5. Float32 losses
    # (ln 8 + 2 and ln 8 rounded to float32, then subtracted in float64): error < 1e-6.
    np.testing.assert_allclose(got, [1.0, 0.5], atol=1e-6)
    # The clip of the domain means (the old rule) would give [0, 0.5].
    with np.errstate(invalid="ignore"):
        old = excess_losses(np.array([math.log(V), math.log(V) + 0.5]), np.full(2, math.log(V)))
    np.testing.assert_allclose(old, [0.0, 0.5], atol=1e-12)


def test_per_token_and_per_domain_clipping_pick_opposite_winners():
    """200 updates on the batches above through the trainer's signals. The expected α comes
    from the update written out with numpy on the hand-derived scores s = [1, 0.5] (per token)
    or [0, 0.5] (domain means). Tolerance: the scores carry float32 rounding (< 1e-6, see
    above); α's logits add 200 of them, error < 2e-4 in log α, so rtol 1e-3 on α."""

    def expected(scores):
        alpha = np.full(2, 0.5)
        for _ in range(200):
            z = np.log(alpha) + np.asarray(scores)
            alpha = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            alpha = (1 - 1e-3) * alpha + 1e-3 / 2
        return alpha

    per_token, per_domain = doremi(m=2, total=400), doremi(m=2, total=400, clip="domain")
    for step in range(200):
        for mixer in (per_token, per_domain):
            mixer.observe(step, _step_signals(step))
    np.testing.assert_allclose(per_token.alpha, expected([1.0, 0.5]), rtol=1e-3)
    np.testing.assert_allclose(per_domain.alpha, expected([0.0, 0.5]), rtol=1e-3)
    assert int(np.argmax(per_token.alpha)) == 0 and int(np.argmax(per_domain.alpha)) == 1


def test_trainer_excess_losses_match_the_two_models(tiny_data, tmp_path):
    """On a real run: the signal equals the per-token clip computed here from the two models'
    logits, with and without the training forward's token losses."""
    from tests.mixers.align_fakes import tiny_config

    from mixlab.train.loop import Trainer, train
    from mixlab.train.signals import StepSignals

    train(tiny_config(tiny_data, "train.steps=4"), tmp_path / "ref")
    trainer = Trainer(tiny_config(tiny_data, "mixer.name='doremi'",
                                  f"mixer.reference='{tmp_path / 'ref'}'"), tmp_path / "proxy")
    from mixlab.mixers.base import Plan

    plan = Plan(weights=np.full(3, 1 / 3), counts=np.array([3, 3, 2]))  # every domain present
    trainer.session.mixer.plan = lambda step: plan
    st, result = trainer.train_step(0)
    sample_losses, domains, tokens = result.sample_losses, result.domains, st.batch.tokens

    def token_ce(model):
        model.eval()
        with torch.no_grad():
            logits = model(tokens[:, :-1]).double()
        return -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0].numpy()

    proxy, ref = token_ce(trainer.model), token_ce(trainer.session.reference)
    per_sample = np.maximum(proxy - ref, 0).mean(axis=1)
    want = np.array([per_sample[domains == d].mean() for d in range(3)])
    # float32 logits vs float64 log-softmax here: ~1e-6 per token loss.
    got = StepSignals(0, trainer.session, sample_losses, domains, tokens).excess_losses()
    np.testing.assert_allclose(got, want, atol=1e-5)
    given = StepSignals(0, trainer.session, sample_losses, domains, tokens,
                        token_losses=torch.as_tensor(proxy, dtype=torch.float32))
    np.testing.assert_allclose(given.excess_losses(), want, atol=1e-5)
    assert np.all(want > 0) and np.all(want >= excess_losses(
        [proxy.mean(1)[domains == d].mean() for d in range(3)],
        [ref.mean(1)[domains == d].mean() for d in range(3)]) - 1e-12)
