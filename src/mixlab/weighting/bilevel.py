"""The bi-level step of the data weighting model, factorised into per-sample alignments.

The language model trains on ``L_train(θ, w) = Σ_i w_i ℓ_i(θ) / B`` over a batch of B samples.
One lookahead step ``θ' = θ - η P ∇_θ L_train`` (P = identity, or Adam's denominator when
preconditioned) and the validation loss after it, ``L_val(θ')``. Because θ' is linear in w,

    ∂L_val(θ') / ∂w_i = ⟨∇L_val(θ'), ∂θ'/∂w_i⟩ = -(η / B) ⟨∇ℓ_i(θ), P ∇L_val(θ')⟩

exactly: the hypergradient is one validation gradient at θ' and one pass of the alignment
engine over the batch at θ (``factorised_hypergradient``). No second-order graph through the
LM, any attention kernel (with ``method="fd"``), the LM's own training gradient reused as the
lookahead direction. ``unrolled_hypergradient`` differentiates through the step itself (double
backward, math attention): the reference the tests compare against.

The weighting model's parameters φ then get ``Σ_i (∂L_val/∂w_i) ∂w_i/∂φ``: an ordinary backward
of ``Σ_i h_i w_i(φ)`` through the small network.
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
    check_direction,
    loss_gradient,
    per_sample_alignments,
    trainable_parameters,
    unwrap,
)


def lookahead_step(grad: Mapping[str, torch.Tensor], lr: float,
                   precond: Mapping[str, torch.Tensor] | None = None) -> Direction:
    """The parameter change ``-lr · P g`` of one SGD (or preconditioned) lookahead step."""
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
