"""The alignment engine: jvp and finite differences against the exact backward reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixlab.model import GPT, per_sample_loss
from mixlab.signals.alignment import (
    FD_REL_STEP,
    adam_denominator,
    alignments_backward,
    alignments_fd,
    alignments_jvp,
    dot,
    fd_step,
    flat_grad,
    flatten,
    gaussian_direction,
    group_alignments_backward,
    group_mean,
    group_sums,
    loss_gradient,
    norm,
    per_sample_alignments,
    precondition,
    stratified_counts,
    trainable_parameters,
)

V, S = 64, 16


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(V, S, n_layer=2, n_head=2, d_model=32)


def windows(b: int, seed: int, band: int = V) -> torch.Tensor:
    return torch.randint(0, band, (b, S + 1), generator=torch.Generator().manual_seed(seed))


def trained(steps: int = 30) -> tuple[GPT, torch.optim.AdamW]:
    """A tiny GPT after a few AdamW steps (so the second moment exists and the loss has moved)."""
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = windows(64, seed=3, band=V // 2)
    for step in range(steps):
        opt.zero_grad()
        per_sample_loss(model, data[(step * 8) % 64 : (step * 8) % 64 + 8]).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("state", ["init", "trained"])
def test_jvp_equals_backward_reference(state):
    model = tiny() if state == "init" else trained()[0]
    v = loss_gradient(model, windows(6, seed=5))
    x = windows(10, seed=7)
    ref = alignments_backward(model, x, v)
    got = alignments_jvp(model, x, v, chunk_size=4)  # 3 chunks, the last one short
    assert got.shape == (10,) and got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-4
    # Values are not trivially zero or all alike: samples differ in how they align.
    assert ref.abs().min() > 0 and ref.std() > 0.1 * ref.abs().mean()


@pytest.mark.parametrize("state", ["init", "trained"])
def test_finite_difference_is_close_to_reference(state):
    model = tiny() if state == "init" else trained()[0]
    v = loss_gradient(model, windows(6, seed=5))
    x = windows(10, seed=7)
    ref = alignments_backward(model, x, v)
    got = alignments_fd(model, x, v, chunk_size=4)
    assert cosine(got, ref) > 0.99
    # "trained": the target windows use tokens the model never saw, so the loss is sharply
    # curved along the target gradient: the worst case for a finite difference.
    assert rel_err(got, ref) < (1e-2 if state == "init" else 0.15)


def test_finite_difference_restores_parameters_bit_for_bit():
    model, _ = trained(5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = loss_gradient(model, windows(4, seed=5))
    alignments_fd(model, windows(6, seed=7), v, rel_step=0.05)  # a large step: rounding visible
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n

    # Also when a forward fails half way (after the parameters were moved).
    calls = {"n": 0}

    def failing(m, tokens, params=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return per_sample_loss(m, tokens, params)

    with pytest.raises(RuntimeError, match="boom"):
        alignments_fd(model, windows(6, seed=7), v, loss_fn=failing)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_fd_step_rule():
    params = {"w": torch.tensor([3.0, 4.0])}  # norm 5
    v = {"w": torch.tensor([0.0, 0.5])}  # norm 0.5
    assert fd_step(params, v, 1e-3) == pytest.approx(1e-3 * 5 / 0.5)
    assert fd_step({"w": torch.zeros(2)}, v, 1e-3) == pytest.approx(1e-3 / 0.5)
    assert fd_step(params, {"w": torch.zeros(2)}) == 0.0
    with pytest.raises(ValueError, match="rel_step"):
        fd_step(params, v, 0.0)
    assert FD_REL_STEP > 0


def test_zero_direction_gives_zero_alignments():
    model = tiny()
    zero = {n: torch.zeros_like(p) for n, p in trainable_parameters(model).items()}
    x = windows(3, seed=1)
    assert torch.equal(alignments_fd(model, x, zero), torch.zeros(3))
    assert torch.equal(alignments_jvp(model, x, zero), torch.zeros(3))


def test_group_aggregation_is_exact():
    model = tiny()
    v = loss_gradient(model, windows(6, seed=5))
    x = windows(12, seed=9)
    groups = np.array([0, 2, 2, 0, 3, 3, 3, 0, 2, 3, 0, 2])  # group 1 empty
    per_sample = alignments_jvp(model, x, v).double().numpy()
    by_group = group_mean(per_sample, groups, 5)
    ref = group_alignments_backward(model, x, groups, 5, v)
    assert np.isnan(by_group[1]) and np.isnan(ref[1]) and np.isnan(by_group[4])
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(by_group[ok], ref[ok], rtol=1e-4)
    # The pure aggregation by hand.
    vals = np.array([1.0, 2.0, 4.0, 8.0])
    sums, counts = group_sums(vals, np.array([1, 0, 1, 1]), 3)
    np.testing.assert_array_equal(sums, [2.0, 13.0, 0.0])
    np.testing.assert_array_equal(counts, [1, 3, 0])
    np.testing.assert_array_equal(group_mean(vals, np.array([1, 0, 1, 1]), 3)[:2], [2.0, 13.0 / 3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        group_sums(vals, np.array([0, 1, 3, 0]), 3)


def test_preconditioned_direction_by_hand():
    model, opt = trained(7)
    v = loss_gradient(model, windows(6, seed=5))
    pv = precondition(v, opt, model)
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    for n, p in trainable_parameters(model).items():
        st = opt.state[p]
        assert int(st["step"]) == 7
        by_hand = v[n] / (torch.sqrt(st["exp_avg_sq"] / (1 - beta2**7)) + eps)
        torch.testing.assert_close(pv[n], by_hand, rtol=1e-6, atol=0)
    # The engine aligns with P v exactly like with any other direction.
    x = windows(5, seed=8)
    assert rel_err(alignments_jvp(model, x, pv), alignments_backward(model, x, pv)) < 1e-4
    # Before the first step there is no second moment: P is the identity.
    fresh = tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    assert adam_denominator(fresh_opt, fresh) is None
    v0 = loss_gradient(fresh, windows(2, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(precondition(v0, fresh_opt, fresh).values(), v0.values()))


def test_loss_gradient_matches_backward_and_leaves_model_alone():
    model = tiny()
    model.train()
    x = windows(5, seed=2)
    with torch.no_grad():  # no-grad friendly
        g = loss_gradient(model, x, chunk_size=2)
    assert model.training and model.attention == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    per_sample_loss(model, x).mean().backward()
    ref = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])
    torch.testing.assert_close(flatten(g), ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(flat_grad(model, x), ref, rtol=1e-5, atol=1e-8)
    # Weighted: the gradient of Σ w_x ℓ_x.
    w = torch.tensor([0.5, 0.0, 0.0, 0.0, 2.0])
    gw = loss_gradient(model, x, w)
    ref_w = {n: 0.5 * a + 2.0 * b for (n, a), b in zip(loss_gradient(model, x[:1], torch.ones(1)).items(),
                                                       loss_gradient(model, x[4:], torch.ones(1)).values())}
    for n in gw:
        torch.testing.assert_close(gw[n], ref_w[n], rtol=1e-5, atol=1e-8)


def test_jvp_leaves_mode_and_attention_as_found():
    model = tiny()
    model.train()
    v = loss_gradient(model, windows(2, seed=5))
    alignments_jvp(model, windows(2, seed=1), v)
    assert model.training and model.attention == "sdpa"


def test_direction_helpers():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[2.0]])}
    b = {"x": torch.tensor([3.0, -1.0]), "y": torch.tensor([[0.5]])}
    assert dot(a, b) == 2.0
    assert norm(a) == 3.0
    model = tiny()
    z1, z2 = gaussian_direction(model, 7), gaussian_direction(model, 7)
    assert all(torch.equal(z1[n], z2[n]) for n in z1)
    state = torch.get_rng_state()
    gaussian_direction(model, 8)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    with pytest.raises(ValueError, match="does not match"):
        alignments_jvp(model, windows(2, seed=1), {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\[b, T\+1\]"):
        alignments_jvp(model, torch.zeros(2, 1, dtype=torch.long), z1)


def test_dispatcher_and_unknown_method():
    from mixlab.errors import ConfigError

    model = tiny()
    v = loss_gradient(model, windows(2, seed=5))
    x = windows(3, seed=1)
    assert torch.equal(per_sample_alignments(model, x, v, "jvp"), alignments_jvp(model, x, v))
    with pytest.raises(ConfigError, match="'jvp', 'fd', 'backward'"):
        per_sample_alignments(model, x, v, "ghost")


def test_stratified_counts():
    np.testing.assert_array_equal(stratified_counts(3, 8), [3, 3, 2])
    np.testing.assert_array_equal(stratified_counts(3, 8, offset=2), [3, 2, 3])
    np.testing.assert_array_equal(stratified_counts(4, 2, offset=3), [1, 0, 0, 1])
    # Rotating the offset by the total covers every group in turn.
    seen = sum(stratified_counts(5, 2, offset=2 * u) for u in range(5))
    np.testing.assert_array_equal(seen, [2, 2, 2, 2, 2])
    assert math.isclose(stratified_counts(7, 0).sum(), 0)
