"""DoGE: the reference's per-domain-gradient rule against a numpy re-implementation with
hand-made gradient vectors (Olivia-fsm/DoGE ``src/trainer.py:719-770``), the Gram signal on a
real model, the alignment-engine variant (update rule by hand, the norm estimate), real runs,
resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.mixers.align_fakes import AlignSignals, constant_alignments, tiny_config
from tests.mixers.fakes import make_ctx, torch_roundtrip
from tests.train.conftest import assert_resume_identical

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.doge import chi_mean, doge_scores, doge_update, gradient_norms
from mixlab.model import GPT
from mixlab.signals.alignment import alignments_jvp, gaussian_direction, loss_gradient, norm
from mixlab.train.loop import Trainer


def test_chi_mean():
    assert chi_mean(1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert chi_mean(4) == pytest.approx(math.sqrt(0.5) * 0.75 * math.sqrt(math.pi), rel=1e-12)
    assert 0.99 < chi_mean(100) < 1.0


def test_gradient_norms_by_hand():
    # Two probes, three groups (group 2 empty): per-group means of the probe values.
    probe = np.array([[3.0, 1.0, 4.0], [0.0, 2.0, 2.0]])
    groups = np.array([0, 1, 1])
    got = gradient_norms(probe, groups, 3)
    c = chi_mean(2)
    np.testing.assert_allclose(got[:2], [math.sqrt((9 + 0) / 2) / c, math.sqrt((2.5**2 + 2**2) / 2) / c])
    assert np.isnan(got[2])


def test_gradient_norm_estimate_is_unbiased_on_a_real_model():
    torch.manual_seed(0)
    model = GPT(64, 16, n_layer=2, n_head=2, d_model=32)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    exact = norm(loss_gradient(model, x))
    r = 120
    probe = np.stack([alignments_jvp(model, x, gaussian_direction(model, s)).double().numpy()
                      for s in range(r)])
    est = gradient_norms(probe, np.zeros(4, dtype=np.int64), 1)[0]
    assert est == pytest.approx(exact, rel=0.2)  # std of the estimate ~ 1/sqrt(2R) = 6.5%


def test_scores_and_update_by_hand():
    s = doge_scores(np.array([2.0, -1.0, 12.0, np.nan]), mean_norm=2.0, lr=0.01, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s[:3], [0.01 * 2 / (2 + 1e-6), 0.0, 0.05])  # clipped to [0, 5 lr]
    assert np.isnan(s[3])
    alpha = doge_update(np.full(3, 1 / 3), np.array([0.01, 0.0, 0.05]), mu=0.01, eps=0.0)
    e = np.exp([1.0, 0.0, 5.0])
    np.testing.assert_allclose(alpha, e / e.sum(), rtol=1e-12)
    smoothed = doge_update(np.full(3, 1 / 3), np.array([0.01, 0.0, 0.05]), mu=0.01, eps=0.3)
    np.testing.assert_allclose(smoothed, 0.7 * e / e.sum() + 0.1, rtol=1e-12)


def doge(m: int = 3, steps: int = 100, **options):
    return build_mixer("doge", options, make_ctx(m, steps, 8))


def test_mixer_update_by_hand():
    mixer = doge(update_every=2, norm_probes=2, estimator="alignments")
    # Domain alignments W = [4, 1, -2], probe values give ||ĝ_i|| = [1, 1, 1] / chi_mean(2) · c.
    probe = np.ones((2, 3)) * chi_mean(2)  # so every estimated norm is exactly 1
    sig = AlignSignals(0, measure=constant_alignments(np.array([4.0, 1.0, -2.0]), probe=probe), lr=0.002)
    mixer.observe(0, sig)
    assert sig.calls == []  # not an update step
    mixer.observe(1, sig)
    counts, direction, method, pre, probes = sig.calls[0]
    np.testing.assert_array_equal(counts, [3, 3, 2])
    assert (direction, method, pre, probes) == ("domains", "jvp", False, 2)
    scores = np.clip(0.002 * np.array([4.0, 1.0, -2.0]) / (1 + 1e-6), 0, 0.01)
    alpha = np.exp(scores / 0.01) / np.exp(scores / 0.01).sum()
    np.testing.assert_allclose(mixer.report()["alpha"], alpha, rtol=1e-12)
    # Published proxy: uniform sampling, loss weighted by α; after the run, the average α.
    plan = mixer.plan(2)
    np.testing.assert_array_equal(plan.weights, np.full(3, 1 / 3))
    np.testing.assert_allclose(plan.loss_weights, alpha, rtol=1e-12)
    np.testing.assert_allclose(mixer.plan(100).weights, alpha, rtol=1e-12)  # one update: avg = α
    json.dumps(mixer.report(), allow_nan=False)


def test_unmeasured_domain_keeps_its_score_and_target_objective():
    mixer = doge(update_every=1, objective="target", apply="sample", align_samples=5,
                 estimator="alignments")
    first = AlignSignals(0, measure=constant_alignments(np.array([1.0, 2.0, 3.0])))
    mixer.observe(0, first)
    assert first.calls[0][1] == "target"
    np.testing.assert_array_equal(first.calls[0][0], [2, 2, 1])  # align_samples = 5
    before = np.array(mixer.state_dict()["scores"])

    def only_two(counts, direction, probes):
        res = constant_alignments(np.array([0.5, 0.5, 0.5]))(counts, direction, probes)
        keep = res.domains != 2
        return type(res)(res.values[keep], res.domains[keep], 1.0, res.probe_values[:, keep])

    mixer.observe(1, AlignSignals(1, measure=only_two))
    after = np.array(mixer.state_dict()["scores"])
    assert after[2] == before[2] and after[0] != before[0]
    np.testing.assert_array_equal(mixer.plan(2).weights, mixer.report()["alpha"])  # sample mode


@pytest.mark.parametrize(
    ("options", "match"),
    [({"mu": 0.0}, "mu"), ({"dw_min": 1.0, "dw_max": 0.5}, "dw_min"), ({"eps": 2.0}, "eps"),
     ({"norm_probes": 0}, "norm_probes"), ({"objective": "ood"}, "objective"),
     ({"grad_clip": -1.0}, "grad_clip"), ({"estimator": "hessian"}, "estimator")],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        doge(**options)


def test_state_round_trip():
    a = np.array([0.3, -0.2, 0.1])
    straight, first = doge(estimator="alignments"), doge(estimator="alignments")
    for step in range(3):
        for mixer in (straight, first):
            mixer.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    resumed = doge(estimator="alignments")
    resumed.load_state_dict(torch_roundtrip(first.state_dict()))
    for step in range(3, 6):
        for mixer in (straight, resumed):
            mixer.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    assert resumed.state_dict() == straight.state_dict()


def test_target_objective_favours_the_target_domain(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "mixer.name='doge'", "mixer.options.objective='target'",
                      "mixer.options.update_every=2", "target.domain='c'", "target.docs=6",
                      "train.steps=30")
    trainer = Trainer(cfg, tmp_path / "r")
    trainer.run()
    alpha = trainer.session.mixer.report()["alpha"]
    assert int(np.argmax(alpha)) == 2, alpha


def test_generic_resume_is_bit_identical(tiny_data, tmp_path):
    extra = ("mixer.name='doge'", "mixer.options.update_every=3", "mixer.options.norm_probes=2",
             "checkpoint.every=5")
    full = assert_resume_identical(lambda: tiny_config(tiny_data, *extra), tmp_path, kill_after=13)
    # The generic objective moved α away from uniform, and the output is the average α.
    alpha_avg = np.array(list(full["weights_final"].values()))
    assert np.abs(alpha_avg - 1 / 3).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The published rule: per-domain gradients, each clipped, Σ over j ≠ i (issue 13, finding 8).


def reference_doge(g, alpha, lr, target=None, clip=5.0, mu=0.01, dw_min=0.0, dw_max=5.0):
    """One update of ``update_domain_weights_distributed`` (src/trainer.py:719-770) written out
    with numpy on gradient *vectors* g [m, d] (and a target vector): clip every vector as
    clip_grad_norm_ does, score, clip the scores, softmax."""

    def clipped(v):
        return v * min(1.0, clip / (np.linalg.norm(v) + 1e-6))

    train = np.stack([clipped(v) for v in g])
    if target is None:
        mat = train @ train.T
        scores = lr * (mat.sum(axis=-1) - np.diag(mat))
    else:
        scores = lr * (train @ clipped(np.asarray(target)))
    scores = scores / (np.linalg.norm(train, axis=-1).mean() + 1e-6)
    scores = np.clip(scores, lr * dw_min, lr * dw_max)
    z = np.log(alpha) + scores / mu
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


# Domain 0: a large gradient (norm 10.05, clipped to 5) orthogonal to domain 1 and weakly
# aligned with domain 2; domains 1 and 2 help each other.
G = np.array([[10.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.5, 1.0]])


class VectorSignals:
    """Signals of a world whose per-domain gradients are the rows of ``g`` (and ``target``):
    the Gram signal of the published estimator, and alignments consistent with the same vectors
    for the engine (every sample of domain i aligns by <g_i, Σ_j g_j>, probes give ||g_i||)."""

    def __init__(self, step, g, target=None, lr=1e-3):
        self.step, self.g, self.target, self.lr = step, np.asarray(g), target, lr

    def domain_gradient_gram(self, counts, target=False, target_windows=0):
        vecs = np.vstack([self.g, [self.target]]) if target else self.g
        return vecs @ vecs.T

    def sample_alignments(self, counts, direction="target", method="jvp", precondition=False,
                          probes=0, target_windows=0):
        v = self.g.sum(axis=0) if direction == "domains" else np.asarray(self.target)
        norms = np.linalg.norm(self.g, axis=1) * chi_mean(probes)
        return constant_alignments(self.g @ v, probe=np.tile(norms, (probes, 1)))(
            np.asarray(counts), direction, probes)

    def learning_rate(self):
        return self.lr


def test_generic_follows_the_reference_update_on_hand_made_gradients():
    """30 updates; the expected α from the vectors with numpy (clip the vectors, then the
    inner products), the mixer from their Gram matrix. Tolerance: both sides are float64
    sums of a few products; the mixer multiplies the clip factors into the Gram matrix instead
    of the vectors, a few ulp per score, ~1e-14 after 30 softmax steps; rtol 1e-10."""
    mixer = doge(m=3, steps=100)
    alpha = np.full(3, 1 / 3)
    for step in range(30):
        mixer.observe(step, VectorSignals(step, G))
        alpha = reference_doge(G, alpha, 1e-3)
        np.testing.assert_allclose(mixer.report()["alpha"], alpha, rtol=1e-10)
    # Σ_{j≠i}: domain 0's own huge ||g_0||² does not count; it scores least, domain 2 most.
    assert int(np.argmax(alpha)) == 2 and int(np.argmin(alpha)) == 0
    # The j = i / unclipped engine makes domain 0 the winner on the same gradients.
    engine = doge(m=3, steps=100, estimator="alignments")
    for step in range(30):
        engine.observe(step, VectorSignals(step, G))
    assert int(np.argmax(engine.report()["alpha"])) == 0


def test_clip_changes_the_scores_as_the_reference_does():
    """One update with the clip off and on: only the clipped one matches the reference."""
    off = doge(m=3, grad_clip=0.0)
    on = doge(m=3)
    for mixer in (off, on):
        mixer.observe(0, VectorSignals(0, G))
    start = np.full(3, 1 / 3)
    np.testing.assert_allclose(on.report()["alpha"], reference_doge(G, start, 1e-3), rtol=1e-12)
    np.testing.assert_allclose(off.report()["alpha"], reference_doge(G, start, 1e-3, clip=np.inf),
                               rtol=1e-12)
    assert np.abs(np.array(on.report()["alpha"]) - off.report()["alpha"]).max() > 1e-3


def test_quadratic_world_target_aligned_domain_goes_up_random_domain_goes_down():
    """A quadratic model: domain gradients are fixed vectors, the target's gradient points along
    domain 1's; domain 2 is an unlearnable random-token domain whose gradient is orthogonal to
    everything. α_1 must rise, α_2 fall, and every α match the reference update."""
    g = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    target = np.array([0.0, 1.5, 0.0, 0.0])
    mixer = doge(m=3, objective="target")
    alpha = np.full(3, 1 / 3)
    for step in range(40):
        mixer.observe(step, VectorSignals(step, g, target=target))
        alpha = reference_doge(g, alpha, 1e-3, target=target)
    got = np.array(mixer.report()["alpha"])
    np.testing.assert_allclose(got, alpha, rtol=1e-10)  # as above
    assert got[1] > 1 / 3 > got[2] and got[1] == got.max()


def test_domain_gradient_gram_matches_autograd_on_a_real_model(tiny_data, tmp_path):
    """The trainer's Gram signal against per-domain gradients taken here with autograd on the
    same auxiliary batch. Tolerance: float32 gradients summed in another order, inner products
    of ~1e4 parameters: rtol 1e-4."""
    import copy

    from mixlab.model import per_sample_loss
    from mixlab.train.signals import StepSignals, _draw

    trainer = Trainer(tiny_config(tiny_data, "mixer.name='doge'", "target.domain='c'",
                                  "target.docs=6"), tmp_path / "r")
    aux = copy.deepcopy(trainer.session.aux_sampler.state_dict())
    counts = np.array([3, 3, 2])
    gram = StepSignals(0, trainer.session, None, None, None).domain_gradient_gram(counts, target=True)
    trainer.session.aux_sampler.load_state_dict(aux)  # the same batch again
    parts = _draw(trainer.session, counts)
    tokens = torch.cat([p.tokens for p in parts])
    domains = np.concatenate([p.domains for p in parts])
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.eval()

    def flat(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    vecs = [flat(per_sample_loss(trainer.model, tokens[torch.from_numpy(domains == i)]).mean())
            for i in range(3)]
    vecs.append(flat(per_sample_loss(trainer.model, trainer.session.target.probe).mean()))
    want = torch.stack(vecs) @ torch.stack(vecs).T
    np.testing.assert_allclose(gram, want.numpy(), rtol=1e-4)
