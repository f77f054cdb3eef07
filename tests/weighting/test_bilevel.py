"""The factorised hypergradient against differentiating through the lookahead step."""

from __future__ import annotations

import torch

from mixlab.model import GPT, per_sample_loss
from mixlab.signals.alignment import adam_denominator, loss_gradient, trainable_parameters
from mixlab.weighting.bilevel import (
    factorised_hypergradient,
    lookahead_val_gradient,
    shifted,
    unrolled_hypergradient,
)

V, S = 64, 16


def trained_gpt(steps: int = 20) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = GPT(V, S, n_layer=2, n_head=2, d_model=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, V // 2, (64, S + 1), generator=torch.Generator().manual_seed(3))
    for step in range(steps):
        opt.zero_grad()
        per_sample_loss(model, data[(step * 8) % 64 : (step * 8) % 64 + 8]).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def batch(b: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (b, S + 1), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def factorised(model, tokens, w, val, lr, method, precond=None):
    b = tokens.shape[0]
    g = loss_gradient(model, tokens, w / b)
    vg = lookahead_val_gradient(model, g, lr, val, precond=precond)
    return factorised_hypergradient(model, tokens, vg, lr, b, precond=precond, method=method)


def test_factorised_equals_unrolled_sgd_lookahead():
    model, _ = trained_gpt()
    tokens, val = batch(8, 1), batch(6, 2)
    w = torch.linspace(0.5, 1.5, 8)
    ref = unrolled_hypergradient(model, tokens, w, val, lr=0.5)
    for method, tol in (("jvp", 1e-4), ("backward", 1e-4), ("fd", 2e-2)):
        got = factorised(model, tokens, w, val, 0.5, method)
        assert rel_err(got, ref) < tol, method
    # Not a trivially small quantity: the samples disagree.
    assert float(ref.abs().max()) > 0 and float(ref.std()) > 0


def test_factorised_equals_unrolled_with_adam_preconditioner():
    model, opt = trained_gpt()
    precond = adam_denominator(opt, model)
    assert precond is not None
    tokens, val = batch(8, 4), batch(6, 5)
    w = torch.ones(8)
    ref = unrolled_hypergradient(model, tokens, w, val, lr=1e-3, precond=precond)
    got = factorised(model, tokens, w, val, 1e-3, "jvp", precond)
    assert rel_err(got, ref) < 1e-4


def test_parameters_restored_bit_for_bit():
    model, _ = trained_gpt(5)
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    tokens, val = batch(4, 1), batch(4, 2)
    factorised(model, tokens, torch.ones(4), val, 0.3, "fd")
    delta = {n: torch.ones_like(p) for n, p in before.items()}
    try:
        with shifted(model, delta):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    for n, p in trainable_parameters(model).items():
        assert torch.equal(p, before[n]), n


def test_sign_aligned_samples_get_negative_hypergradient():
    """A sample equal to the validation data lowers L_val when up-weighted: ∂L_val/∂w < 0
    (a small lookahead step: with a large one the exact hypergradient may flip, which it does
    here at lr 1e-3 because the loss of these random windows is sharply curved)."""
    model, _ = trained_gpt()
    val = batch(4, 9)
    tokens = torch.cat([val, batch(4, 10)])
    h = factorised(model, tokens, torch.ones(8), val, 1e-6, "jvp")
    assert float(h[:4].mean()) < float(h[4:].mean())
    assert float(h[:4].max()) < 0
