"""The factorised hypergradient against differentiating through the lookahead step, and
against a finite difference of AdamW's lookahead written out in the test (tests/weighting/
reference.py)."""

from __future__ import annotations

import torch
from tests.weighting.reference import adam_denominators, cosine, fd_hypergradient

from mixlab.model import GPT, per_sample_loss
from mixlab.signals.alignment import loss_gradient, trainable_parameters
from mixlab.weighting.bilevel import (
    adam_preconditioner,
    factorised_hypergradient,
    has_dropout,
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


def batch(b: int, seed: int, high: int = V) -> torch.Tensor:
    return torch.randint(0, high, (b, S + 1), generator=torch.Generator().manual_seed(seed))


def in_distribution(b: int, seed: int) -> torch.Tensor:
    """Windows like the ones ``trained_gpt`` trained on (tokens < V/2). Tokens Adam has barely
    seen have v ≈ 0, so Adam's step along their gradient is huge and L_val(θ'(w)) is too curved
    in w for any finite difference (h = 1e-2 and 1e-3 disagreed by 77% on random windows)."""
    return batch(b, seed, V // 2)


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
    """Both sides with P = 1 / (Adam's denominator) built in the test; mixlab's P is that one."""
    model, opt = trained_gpt()
    denom = adam_denominators(opt, model)
    precond = {n: (1.0 / d).float() for n, d in denom.items()}
    got_p = adam_preconditioner(opt, model)
    assert got_p is not None
    for n, p in precond.items():
        # float32 sqrt and division against float64: a few ulps.
        assert torch.allclose(got_p[n], p, rtol=1e-6, atol=0), n
    # In-distribution windows: on random ones Adam's step is huge (see in_distribution) and two
    # float32 computations of the same quantity part by 1.5e-3.
    tokens, val = in_distribution(8, 4), in_distribution(6, 5)
    w = torch.ones(8)
    ref = unrolled_hypergradient(model, tokens, w, val, lr=1e-3, precond=precond)
    got = factorised(model, tokens, w, val, 1e-3, "jvp", precond)
    assert rel_err(got, ref) < 1e-4


def test_adam_lookahead_matches_a_finite_difference_of_adamws_step():
    """∂L_val(θ')/∂w_i for θ' = θ - lr · (Σ w_i ∇ℓ_i / B) / (sqrt(v̂) + ε), v̂ from the AdamW that
    trained the model: central differences in w (float64, tests/weighting/reference.py) against
    the factorised hypergradient with mixlab's preconditioner. lr = 1e-2 moves each coordinate by
    ~lr, enough for the curvature to matter: the inverted step θ - lr (sqrt(v̂) + ε) g that was
    here before gave cosine 0.06 and 4e-4 of the norm, the SGD step cosine 0.14."""
    model, opt = trained_gpt()
    tokens, val = in_distribution(8, 4), in_distribution(6, 5)
    w = torch.linspace(0.5, 1.5, 8)
    lr = 1e-2
    denom = adam_denominators(opt, model)
    ref = fd_hypergradient(model, tokens, w, val, lr, denom, h=1e-3)
    # The reference is converged in h: the truncation error falls like h² (measured 4e-8 between
    # h = 1e-3 and 1e-4; float64 rounding is ~1e-16 · L / h ≈ 1e-12 here).
    assert rel_err(fd_hypergradient(model, tokens, w, val, lr, denom, h=1e-4), ref) < 1e-6
    got = factorised(model, tokens, w, val, lr, "jvp", adam_preconditioner(opt, model))
    # Measured 2e-7: float32 jvp and gradients against float64. 1e-5 leaves room for other
    # CPUs' summation order (~sqrt(#params) ε_32 ≈ 1e-5 in the worst case).
    assert rel_err(got, ref) < 1e-5
    assert cosine(got, ref) > 1 - 1e-8
    # The finite-difference engine (what weighting.options.method = 'fd' runs): measured 7e-4, its
    # documented 4e-4 to 1e-3 at this scale.
    got_fd = factorised(model, tokens, w, val, lr, "fd", adam_preconditioner(opt, model))
    assert rel_err(got_fd, ref) < 5e-3


def test_a_parameter_without_adam_state_takes_the_sgd_step():
    """A parameter Adam never stepped (no gradient so far) has no second moment: it gets P = 1
    (its SGD step) and a finite hypergradient, not Adam's inf denominator."""
    model, opt = trained_gpt(0)
    data = in_distribution(8, 11)
    frozen = "ln_f.bias"
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        per_sample_loss(model, data).mean().backward()
        dict(model.named_parameters())[frozen].grad = None  # Adam skips it, keeps no state
        opt.step()
    opt.zero_grad(set_to_none=True)
    p = adam_preconditioner(opt, model)
    assert p is not None
    assert torch.equal(p[frozen], torch.ones_like(p[frozen]))
    assert all(bool(torch.isfinite(t).all()) for t in p.values())
    tokens, val = in_distribution(8, 12), in_distribution(6, 13)
    w = torch.linspace(1.5, 0.5, 8)
    lr = 1e-2
    ref = fd_hypergradient(model, tokens, w, val, lr, adam_denominators(opt, model))
    got = factorised(model, tokens, w, val, lr, "jvp", p)
    assert bool(torch.isfinite(got).all())
    assert rel_err(got, ref) < 1e-5  # as in the test above
    # Before any optimizer step there is no state at all: a plain SGD lookahead.
    fresh, fresh_opt = trained_gpt(0)
    assert adam_preconditioner(fresh_opt, fresh) is None


def test_has_dropout():
    assert not has_dropout(GPT(V, S, n_layer=1, n_head=2, d_model=16))
    assert has_dropout(GPT(V, S, n_layer=1, n_head=2, d_model=16, dropout=0.1))
    # An attention kernel's dropout probability held as a float (HF Llama-style attention).
    attn = torch.nn.Linear(2, 2)
    attn.attention_dropout = 0.1
    assert has_dropout(torch.nn.Sequential(attn))


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
