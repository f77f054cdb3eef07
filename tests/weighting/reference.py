"""Reference hypergradients for the DWM tests, built from torch alone (nothing from mixlab).

``fd_hypergradient`` differentiates ``L_val(θ'(w))`` in w by central differences, where
``θ'(w) = θ - lr · (Σ_i w_i ∇ℓ_i(θ) / B) / d`` is the lookahead written out here: d = 1 (SGD) or
AdamW's denominator ``sqrt(v / (1 - β2^t)) + ε`` read from a real ``torch.optim.AdamW``'s state
(``adam_denominators``, the formula of torch/optim/adamw.py, ``_single_tensor_adamw``). All in
float64 on a copy of the model in eval mode, with the loss (mean next-token cross-entropy per
sample) written out too.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def params_of(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name (tied weights once, as ``named_parameters`` yields them)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adam_denominators(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """float64 ``sqrt(exp_avg_sq / (1 - β2^step)) + eps`` per parameter; 1 (the SGD step) for a
    parameter the optimizer holds no state for (the convention the DWM documents)."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = {}
    for n, p in params_of(model).items():
        st = opt.state.get(p, {})
        if "exp_avg_sq" not in st:
            out[n] = torch.ones_like(p, dtype=torch.float64)
            continue
        beta2, eps = group[id(p)]["betas"][1], group[id(p)]["eps"]
        bias2 = 1.0 - beta2 ** float(st["step"])
        out[n] = st["exp_avg_sq"].double().sqrt() / math.sqrt(bias2) + eps
    return out


def sample_losses(net: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[b] mean next-token cross-entropy of each window [b, T+1], in the logits' dtype."""
    logits = net(tokens[:, :-1])
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.reshape(b * t, v), tokens[:, 1:].reshape(b * t), reduction="none")
    return ce.view(b, t).mean(dim=1)


def fd_hypergradient(model: nn.Module, tokens: torch.Tensor, weights: torch.Tensor,
                     val: torch.Tensor, lr: float, denom: dict[str, torch.Tensor] | None = None,
                     h: float = 1e-3) -> torch.Tensor:
    """[B] float64 ``(L_val(θ'(w + h e_i)) - L_val(θ'(w - h e_i))) / 2h`` (see module docstring).

    θ' is linear in w, so the per-sample gradients ∇ℓ_i are taken once; each L_val is one
    forward of the validation windows ``val`` [n, T+1]."""
    net = copy.deepcopy(model).double().eval()
    params = params_of(net)
    names = list(params)
    b = tokens.shape[0]
    per_sample = [
        torch.autograd.grad(sample_losses(net, tokens[i : i + 1]).sum(), [params[n] for n in names])
        for i in range(b)
    ]
    theta = {n: params[n].detach().clone() for n in names}
    d = denom or {n: torch.ones_like(theta[n]) for n in names}
    w0 = weights.detach().double().cpu()

    def val_loss(w: torch.Tensor) -> float:
        with torch.no_grad():
            for j, n in enumerate(names):
                g = sum(w[i] * per_sample[i][j] for i in range(b)) / b
                params[n].copy_(theta[n] - lr * g / d[n])
            return float(sample_losses(net, val).mean())

    out = []
    for i in range(b):
        e = torch.zeros(b, dtype=torch.float64)
        e[i] = h
        out.append((val_loss(w0 + e) - val_loss(w0 - e)) / (2 * h))
    return torch.tensor(out, dtype=torch.float64)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))
