"""The alignment engine: per-sample inner products <∇ℓ_x(θ), v> in one pass.

DGA, DoGE and data weighting all need inner products between the gradient of some data and
a direction ``v`` (a target gradient, a validation gradient, a sum of domain gradients). The
published code gets them with one backward pass and one gradient buffer per domain. But
``<∇ℓ_x(θ), v>`` is the directional derivative of ℓ_x along ``v``, so for a batch of samples
from any mix of domains every per-sample value comes out of one pass:

- ``method="jvp"``: forward-mode autodiff, ``torch.func.jvp`` of the per-sample loss vector
  along ``v`` through ``torch.func.functional_call``, with the model's ``"math"`` attention
  (the fused CPU kernel has no forward-mode AD). Exact up to float rounding.
- ``method="fd"``: central finite difference ``(ℓ(θ + r v) - ℓ(θ - r v)) / 2r``: two ordinary
  forwards, no graph, any attention kernel, any wrapper. The parameters are perturbed in place
  and copied back from a saved copy, so θ is restored bit for bit. Step rule: see ``fd_step``.
- ``method="backward"``: one backward pass per sample. Exact and slow; the reference for tests.

Per-sample values aggregate into any grouping by linearity (the mean of ``<∇ℓ_x, v>`` over a
group is ``<∇ mean_group ℓ, v>``), so 8 domains or 4,096 clusters cost the same; see
``group_mean``. ``group_alignments_backward`` is the published per-group backward loop, kept
as the reference and the benchmark baseline.

A *direction* is a ``dict`` from parameter name (as ``named_parameters()`` yields it on the
bare model, tied weights once) to a float32 tensor of that parameter's shape. Every function
here runs the model in eval mode (no dropout: the values are deterministic) and restores the
mode it found; none reads or writes ``.grad``, so they can run between two optimizer steps.

Preconditioning (``precondition``): with AdamW's second moment ``s`` (``exp_avg_sq``) after
``t`` steps, ``P = 1 / (sqrt(s / (1 - β2^t)) + ε)`` element-wise, Adam's own denominator; the
preconditioned alignment is ``<∇ℓ_x, P v>``, the first-order change of ℓ_x under an Adam-like
step along ``v`` (momentum and weight decay left out).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from mixlab.errors import ConfigError
from mixlab.model import attention_impl, per_sample_loss

Direction = dict[str, torch.Tensor]
"""Parameter name -> tensor shaped like that parameter (a vector in parameter space)."""

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(model, tokens [b, T+1], params=None) -> [b]``; ``per_sample_loss`` by default."""

AutocastFactory = Callable[[], contextlib.AbstractContextManager]

Method = Literal["jvp", "fd", "backward"]
METHODS: tuple[str, ...] = ("jvp", "fd", "backward")

FD_REL_STEP = 1e-4
"""Default finite-difference step, relative to the parameter norm (see ``fd_step``)."""

DEFAULT_CHUNK = 32
"""Samples per forward pass inside the engine (bounds activation memory)."""


@dataclass(frozen=True)
class SampleAlignments:
    """Per-sample alignments measured on one batch (what ``Signals.sample_alignments`` returns).

    ``values[x] = <∇ℓ_x(θ), P v>`` (P = identity unless preconditioned), ``domains[x]`` the
    domain index of sample x, and ``direction_sq_norm = <v, P v>``: the alignment of the
    direction with itself, the natural unit for a scale-free alignment (DGA divides by it).
    ``probe_values[r, x] = <∇ℓ_x(θ), z_r>`` for seeded Gaussian directions z_r ~ N(0, I): the
    mean over a group of ``(probe mean)²`` estimates the group gradient's squared norm (DoGE).
    """

    values: np.ndarray
    """[N] float64."""
    domains: np.ndarray
    """[N] int64."""
    direction_sq_norm: float
    probe_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """[R, N] float64 (R = 0 when no probe was asked for)."""


# ---------------------------------------------------------------------------------------------
# Parameters and directions.


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for every parameter that requires grad (tied weights once)."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def check_direction(model: nn.Module, direction: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``direction`` has exactly the model's trainable parameters."""
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(direction))
    extra = sorted(set(direction) - set(params))
    if missing or extra:
        raise ValueError(
            f"direction does not match the model's parameters (missing {missing[:3]}, "
            f"unknown {extra[:3]}); build it with loss_gradient() on this model."
        )
    for n, p in params.items():
        if direction[n].shape != p.shape:
            raise ValueError(
                f"direction['{n}'] has shape {tuple(direction[n].shape)}, the parameter "
                f"{tuple(p.shape)}."
            )


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """<a, b> over every entry of two directions, accumulated in float64."""
    return float(sum(float((a[n].double() * b[n].double()).sum()) for n in a))


def norm(a: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm of a direction (or of a parameter dict), accumulated in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in a.values()))


def scale(a: Mapping[str, torch.Tensor], c: float) -> Direction:
    """c · a."""
    return {n: t * c for n, t in a.items()}


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Direction:
    """a + b (same keys)."""
    return {n: a[n] + b[n] for n in a}


def flatten(a: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The direction as one 1-D tensor, entries in the dict's order."""
    return torch.cat([t.reshape(-1) for t in a.values()])


def gaussian_direction(model: nn.Module, seed: int) -> Direction:
    """z ~ N(0, I) over the trainable parameters, from a generator seeded by ``seed`` only
    (the global torch RNG is not touched, so measuring never changes training randomness)."""
    gen = torch.Generator().manual_seed(int(seed))
    return {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
        for n, p in trainable_parameters(model).items()
    }


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _chunks(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}.")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.size(1) < 2 or tokens.size(0) < 1:
        raise ValueError(
            f"tokens must be a non-empty [b, T+1] LongTensor with T >= 1, got {tuple(tokens.shape)}."
        )


def loss_gradient(
    model: nn.Module,
    tokens: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> Direction:
    """∇_θ Σ_x w_x ℓ_x(θ) over the windows ``tokens`` [b, T+1], as a float32 direction.

    ``weights`` [b] defaults to 1/b (the gradient of the mean loss, e.g. of the target's probe
    windows). Computed chunk by chunk with ``torch.autograd.grad`` (``.grad`` is untouched),
    in eval mode, and under ``torch.enable_grad`` so it works inside ``torch.no_grad`` blocks.
    """
    _check_tokens(tokens)
    net = unwrap(model)
    params = trainable_parameters(net)
    b = tokens.shape[0]
    device = next(iter(params.values())).device
    w = torch.full((b,), 1.0 / b) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (b,):
        raise ValueError(f"weights must have shape [{b}], got {tuple(w.shape)}.")
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    names, tensors = list(params), list(params.values())
    with _eval_mode(net), torch.enable_grad():
        for sl in _chunks(b, chunk_size):
            with autocast():
                losses = loss_fn(net, tokens[sl].to(device))
            objective = (losses.float() * w[sl].to(device)).sum()
            parts = torch.autograd.grad(objective, tensors, allow_unused=True)
            for n, g in zip(names, parts):
                if g is not None:
                    grads[n] += g.float()
    return grads


def flat_grad(
    model: nn.Module,
    tokens: torch.Tensor,
    weights: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``loss_gradient`` flattened into one 1-D float32 tensor (parameter order)."""
    return flatten(loss_gradient(model, tokens, weights, **kwargs))


def adam_denominator(optimizer: torch.optim.Optimizer, model: nn.Module) -> Direction | None:
    """Adam's per-coordinate denominator ``sqrt(s / (1 - β2^t)) + ε`` for every trainable
    parameter, read from the optimizer state (``exp_avg_sq`` s, ``step`` t, group ``betas`` and
    ``eps``); None before the first optimizer step (no state yet). A parameter without state
    while others have one gets ``inf`` (Adam has never moved it; its preconditioned entries are
    0)."""
    params = trainable_parameters(model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: Direction = {}
    seen_state = False
    for n, p in params.items():
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            out[n] = torch.full_like(p, math.inf, dtype=torch.float32)
            continue
        seen_state = True
        group = group_of[id(p)]
        beta2 = group["betas"][1]
        step = float(state["step"])
        bias2 = 1.0 - beta2**step
        s = state["exp_avg_sq"].detach().float()
        out[n] = s.sqrt() / math.sqrt(bias2) + group["eps"]
    return out if seen_state else None


def precondition(
    direction: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, model: nn.Module
) -> Direction:
    """``P v`` with ``P = 1 / (sqrt(s / (1 - β2^t)) + ε)`` (Adam's denominator, see module
    docstring); ``v`` unchanged (P = identity) before the optimizer's first step."""
    denom = adam_denominator(optimizer, model)
    if denom is None:
        return {n: t.clone() for n, t in direction.items()}
    return {n: direction[n] / denom[n] for n in direction}


# ---------------------------------------------------------------------------------------------
# Per-sample alignments.


def alignments_jvp(
    model: nn.Module,
    tokens: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    *,
    chunk_size: int = DEFAULT_CHUNK,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] float32 ``<∇ℓ_x(θ), v>`` for each window of ``tokens`` [b, T+1], by forward-mode AD.

    One ``torch.func.jvp`` per chunk of ``chunk_size`` samples through
    ``functional_call(model, θ)`` under the ``"math"`` attention path; exact up to rounding.
    """
    _check_tokens(tokens)
    net = unwrap(model)
    check_direction(net, direction)
    params = trainable_parameters(net)
    primals = {n: p.detach() for n, p in params.items()}
    tangents = {n: direction[n].to(p.device, p.dtype) for n, p in params.items()}
    out = []
    with _eval_mode(net), attention_impl(net, "math"), torch.no_grad():
        for sl in _chunks(tokens.shape[0], chunk_size):
            chunk = tokens[sl].to(next(iter(primals.values())).device)

            def f(p: dict[str, torch.Tensor], chunk: torch.Tensor = chunk) -> torch.Tensor:
                with autocast():
                    return loss_fn(net, chunk, p).float()

            _, d = torch.func.jvp(f, (primals,), (tangents,))
            out.append(d.detach().float().cpu())
    return torch.cat(out)


def fd_step(params: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor],
            rel_step: float = FD_REL_STEP) -> float:
    """The finite-difference step r: ``r = rel_step · ||θ|| / ||v||`` (``rel_step / ||v||`` if
    θ = 0), so the perturbation ``r v`` has norm ``rel_step · ||θ||``.

    Why relative to ||θ||: the rounding error of the difference grows like ε_fp32 · |ℓ| / step
    and must stay small against the change of the loss, while the truncation error grows with
    the step squared times the third derivative along v; tying the step to the parameter scale
    (not to ||v||, which shrinks as the model trains and is huge for random directions) keeps
    both in check for any direction. Measured against the exact values (tiny GPTs of the tests,
    the ~1M-parameter GPT of the benchmark): with 1e-4, relative error 4e-4 to 1e-3 at
    initialisation and for random Gaussian directions (< 1e-2), cosine > 0.9999; the worst case
    seen is a target far from the training data after training (the loss is sharply curved
    along its gradient): relative error 9e-2, cosine 0.998. 1e-3 is 10x worse there, 3e-5 is
    rounding-limited elsewhere. ``method="jvp"`` has none of these errors.
    """
    if rel_step <= 0 or not math.isfinite(rel_step):
        raise ValueError(f"rel_step must be a finite number > 0, got {rel_step}.")
    v = norm(direction)
    if v == 0.0:
        return 0.0
    theta = norm(params)
    return rel_step * (theta if theta > 0 else 1.0) / v


@torch.no_grad()
def alignments_fd(
    model: nn.Module,
    tokens: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    *,
    rel_step: float = FD_REL_STEP,
    chunk_size: int = DEFAULT_CHUNK,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] float32 ``(ℓ_x(θ + r v) - ℓ_x(θ - r v)) / 2r`` for each window, r from ``fd_step``.

    The parameters are moved in place (any wrapper, any attention kernel) and copied back from
    a saved copy afterwards, also when a forward raises: θ is restored bit for bit. A zero
    direction gives zeros without a forward.
    """
    _check_tokens(tokens)
    net = unwrap(model)
    check_direction(net, direction)
    params = trainable_parameters(net)
    r = fd_step(params, direction, rel_step)
    if r == 0.0:
        return torch.zeros(tokens.shape[0])
    saved = {n: p.detach().clone() for n, p in params.items()}
    steps = {n: direction[n].to(p.device, p.dtype) for n, p in params.items()}
    device = next(iter(saved.values())).device

    def losses() -> torch.Tensor:
        parts = []
        for sl in _chunks(tokens.shape[0], chunk_size):
            with autocast():
                parts.append(loss_fn(net, tokens[sl].to(device)).double().cpu())
        return torch.cat(parts)

    with _eval_mode(net):
        try:
            for n, p in params.items():
                p.add_(steps[n], alpha=r)
            plus = losses()
            for n, p in params.items():
                p.copy_(saved[n]).add_(steps[n], alpha=-r)
            minus = losses()
        finally:
            for n, p in params.items():
                p.copy_(saved[n])
    return ((plus - minus) / (2.0 * r)).float()


def alignments_backward(
    model: nn.Module,
    tokens: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    *,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] float32 ``<∇ℓ_x(θ), v>``, one backward pass per sample (exact; the test reference)."""
    _check_tokens(tokens)
    check_direction(model, direction)
    out = [
        _grad_dot(model, tokens[i : i + 1], direction, autocast, loss_fn)
        for i in range(tokens.shape[0])
    ]
    return torch.tensor(out, dtype=torch.float32)


def _grad_dot(
    model: nn.Module,
    tokens: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    autocast: AutocastFactory,
    loss_fn: LossFn,
) -> float:
    """<∇ mean_x ℓ_x, v> over ``tokens`` by one backward pass."""
    g = loss_gradient(model, tokens, chunk_size=tokens.shape[0], autocast=autocast, loss_fn=loss_fn)
    return dot(g, direction)


def group_alignments_backward(
    model: nn.Module,
    tokens: torch.Tensor,
    groups: np.ndarray | torch.Tensor,
    k: int,
    direction: Mapping[str, torch.Tensor],
    *,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> np.ndarray:
    """[k] float64 ``<∇ mean_{x in group j} ℓ_x, v>``: one backward per non-empty group (the
    published per-domain loop); NaN for a group without samples. Equals ``group_mean`` of the
    per-sample values by linearity."""
    _check_tokens(tokens)
    check_direction(model, direction)
    g = np.asarray(groups, dtype=np.int64)
    out = np.full(k, np.nan)
    for j in range(k):
        rows = np.flatnonzero(g == j)
        if rows.size:
            out[j] = _grad_dot(model, tokens[torch.from_numpy(rows)], direction, autocast, loss_fn)
    return out


def per_sample_alignments(
    model: nn.Module,
    tokens: torch.Tensor,
    direction: Mapping[str, torch.Tensor],
    method: str = "jvp",
    *,
    chunk_size: int = DEFAULT_CHUNK,
    rel_step: float = FD_REL_STEP,
    autocast: AutocastFactory = contextlib.nullcontext,
    loss_fn: LossFn = per_sample_loss,
) -> torch.Tensor:
    """[b] ``<∇ℓ_x(θ), v>`` by ``method`` ("jvp", "fd" or "backward"; see module docstring)."""
    if method == "jvp":
        return alignments_jvp(model, tokens, direction, chunk_size=chunk_size, autocast=autocast,
                              loss_fn=loss_fn)
    if method == "fd":
        return alignments_fd(model, tokens, direction, rel_step=rel_step, chunk_size=chunk_size,
                             autocast=autocast, loss_fn=loss_fn)
    if method == "backward":
        return alignments_backward(model, tokens, direction, autocast=autocast, loss_fn=loss_fn)
    raise ConfigError(f"alignment method {method!r} is not one of {', '.join(map(repr, METHODS))}.")


# ---------------------------------------------------------------------------------------------
# Aggregation (pure functions).


def group_sums(values: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """([k] float64 sums of ``values`` [N] per group index ``groups`` [N], [k] int64 counts)."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    if v.shape != g.shape or v.ndim != 1:
        raise ValueError(f"values and groups must be 1-D of equal length, got {v.shape}, {g.shape}.")
    if g.size and (g.min() < 0 or g.max() >= k):
        raise ValueError(f"group indices must be in [0, {k}), got [{g.min()}, {g.max()}].")
    return np.bincount(g, weights=v, minlength=k), np.bincount(g, minlength=k).astype(np.int64)


def stratified_counts(m: int, total: int, offset: int = 0) -> np.ndarray:
    """[m] int64 counts summing to ``total``, as equal as possible: every group gets
    ``total // m`` and the ``total % m`` left over go to groups ``offset, offset + 1, ...``
    (mod m), so rotating ``offset`` from one measurement to the next covers every group even
    when ``total < m``."""
    if m < 1 or total < 0:
        raise ValueError(f"need m >= 1 and total >= 0, got {m}, {total}.")
    counts = np.full(m, total // m, dtype=np.int64)
    counts[(offset + np.arange(total % m)) % m] += 1
    return counts


def group_mean(values: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """[k] mean of ``values`` [N] over each group; NaN for a group without samples.

    By linearity this is ``<∇ mean_{x in group} ℓ_x, v>``: the group's alignment.
    """
    sums, counts = group_sums(values, groups, k)
    out = np.full(k, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out
