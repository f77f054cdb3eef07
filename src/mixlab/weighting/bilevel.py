"""The bi-level step of the data weighting model, factorised into per-sample alignments.

The language model trains on ``L_train(θ, w) = Σ_i w_i ℓ_i(θ) / B`` over a batch of B samples.
One lookahead step ``θ' = θ - η P ∇_θ L_train`` (P = identity, or ``1 / (sqrt(v̂) + ε)``, the
reciprocal of AdamW's denominator, when preconditioned: see ``adam_preconditioner``) and the
validation loss after it, ``L_val(θ')``. Because θ' is linear in w (P is held fixed in w),

    ∂L_val(θ') / ∂w_i = ⟨∇L_val(θ'), ∂θ'/∂w_i⟩ = -(η / B) ⟨∇ℓ_i(θ), P ∇L_val(θ')⟩

exactly: the hypergradient is one validation gradient at θ' and one pass of the alignment
engine over the batch at θ (``factorised_hypergradient``). No second-order graph through the
LM, any attention kernel (with ``method="fd"``), the LM's own training gradient reused as the
lookahead direction. ``unrolled_hypergradient`` differentiates through the step itself (double
backward, math attention): the reference the tests compare against.

The weighting model's parameters φ then get ``Σ_i (∂L_val/∂w_i) ∂w_i/∂φ``: an ordinary backward
of ``Σ_i h_i w_i(φ)`` through the small network.

Train and eval mode: the identity needs the ∇ℓ_i of the alignments to be the very per-sample
gradients whose weighted sum made the lookahead. Every function here runs the LM in eval mode
(no dropout), so the lookahead direction must be an eval-mode gradient too: with dropout the
LM's own training gradient (train mode, dropout masks the engine cannot redraw) is not one,
and the caller recomputes it (``has_dropout``; ``mixlab.train.weighting``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from mixlab.model import attention_impl, per_sample_loss
from mixlab.signals.alignment import (
    AutocastFactory,
    Direction,
    LossFn,
    _eval_mode,
    adam_denominator,
    check_direction,
    loss_gradient,
    per_sample_alignments,
    trainable_parameters,
    unwrap,
)

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
# Float attributes through which attention kernels take their dropout probability: mixlab's
# GPT (CausalSelfAttention.dropout), HF Llama-style attention (attention_dropout), others.
_DROPOUT_ATTRS = ("dropout", "attention_dropout", "attn_dropout", "dropout_p", "attn_pdrop")


def has_dropout(model: nn.Module) -> bool:
    """True when the model's train-mode forward drops anything: a dropout module with p > 0, or
    a float dropout probability > 0 held by a module for its attention kernel."""
    for m in unwrap(model).modules():
        if isinstance(m, _DROPOUT_MODULES) and m.p > 0:
            return True
        for name in _DROPOUT_ATTRS:
            v = getattr(m, name, None)
            if isinstance(v, float) and v > 0:
                return True
    return False


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module) -> Direction | None:
    """P = ``1 / (sqrt(v̂) + ε)`` per trainable parameter, so that ``-lr · P g`` is the step
    ``-lr · g / (sqrt(v̂) + ε)`` AdamW takes along g (torch.optim.AdamW, ``_single_tensor_adamw``:
    ``denom = exp_avg_sq.sqrt() / sqrt(1 - β2^t) + eps``; the bias correction of v is the one
    ``adam_denominator`` applies, with t and v of the optimizer's last step: held fixed in w).
    Momentum and weight decay are left out: the first adds a w-independent shift and scales
    ∂θ'/∂w by (1 - β1) / (1 - β1^(t+1)), the second is w-independent.

    None before the optimizer's first step (no state: the lookahead is a plain SGD step, as
    ``mixlab.signals.alignment.precondition`` does). A parameter without state while others
    have one (Adam never stepped it, e.g. it had no gradient so far) gets P = 1, its SGD
    direction: finite (``adam_denominator`` gives it ``inf``), and bounded. Not Adam's
    first-step form ``1 / (|g| + ε)``: Adam's first step is ``lr · g / (|g| + ε)`` ≈ lr · sign(g)
    as a function of the new gradient, nearly independent of w, so holding that denominator
    fixed in w models the step no better, and its entries reach 1/ε where the batch gradient
    cancels, letting coordinates without signal dominate the alignments.
    """
    denom = adam_denominator(optimizer, model)
    if denom is None:
        return None
    out: Direction = {}
    for n, p in trainable_parameters(model).items():
        if "exp_avg_sq" in optimizer.state.get(p, {}):
            out[n] = 1.0 / denom[n]
        else:
            out[n] = torch.ones_like(p, dtype=torch.float32)
    return out


def lookahead_step(grad: Mapping[str, torch.Tensor], lr: float,
                   precond: Mapping[str, torch.Tensor] | None = None) -> Direction:
    """The parameter change ``-lr · P g`` of one SGD (or preconditioned) lookahead step; ``precond``
    is the multiplier P (``adam_preconditioner``), not Adam's denominator."""
    if precond is None:
        return {n: -lr * g for n, g in grad.items()}
    return {n: -lr * precond[n] * g for n, g in grad.items()}


@contextlib.contextmanager
def shifted(model: nn.Module, delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Move the trainable parameters by ``delta`` in place for the block; restore them bit for
    bit afterwards (from a saved copy, also when the block raises)."""
    params = trainable_parameters(model)
    check_direction(model, delta)
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(delta[n].to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def lookahead_val_gradient(
    model: nn.Module,
    train_grad: Mapping[str, torch.Tensor],
    lr: float,
    val_tokens: torch.Tensor,
    *,
    precond: Mapping[str, torch.Tensor] | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> Direction:
    """``∇L_val(θ')`` with ``θ' = θ - lr · P · train_grad`` and L_val the mean loss of
    ``val_tokens`` [n, T+1]. θ is left as it was."""
    with shifted(model, lookahead_step(train_grad, lr, precond)):
        return loss_gradient(model, val_tokens, autocast=autocast, loss_fn=loss_fn)


def factorised_hypergradient(
    model: nn.Module,
    tokens: torch.Tensor,
    val_grad: Mapping[str, torch.Tensor],
    lr: float,
    batch_size: int,
    *,
    precond: Mapping[str, torch.Tensor] | None = None,
    method: str = "jvp",
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] ``∂L_val(θ')/∂w_i = -(lr / B) ⟨∇ℓ_i(θ), P ∇L_val(θ')⟩`` for the samples ``tokens``
    [b, T+1] (b may be this rank's slice of a global batch of ``batch_size`` = B samples)."""
    direction = dict(val_grad) if precond is None else {n: precond[n] * g for n, g in val_grad.items()}
    a = per_sample_alignments(model, tokens, direction, method, autocast=autocast, loss_fn=loss_fn)
    return -(lr / batch_size) * a


def unrolled_hypergradient(
    model: nn.Module,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    val_tokens: torch.Tensor,
    lr: float,
    *,
    precond: Mapping[str, torch.Tensor] | None = None,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] ``∂L_val(θ')/∂w`` by differentiating through the lookahead step (second order).

    Exact and expensive (a graph of the gradient, math attention): the reference for tests."""
    net = unwrap(model)
    names = list(trainable_parameters(net))
    primals = {n: p.detach().clone().requires_grad_(True) for n, p in trainable_parameters(net).items()}
    w = weights.detach().clone().float().requires_grad_(True)
    b = tokens.shape[0]
    with _eval_mode(net), attention_impl(net, "math"), torch.enable_grad():
        train_loss = (w * loss_fn(net, tokens, primals)).sum() / b
        grads = torch.autograd.grad(train_loss, [primals[n] for n in names], create_graph=True)
        step = lookahead_step(dict(zip(names, grads)), lr, precond)
        after = {n: primals[n] + step[n] for n in names}
        val_loss = loss_fn(net, val_tokens, after).mean()
        (hyper,) = torch.autograd.grad(val_loss, w)
    return hyper.detach()
