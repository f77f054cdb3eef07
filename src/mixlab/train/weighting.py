"""The session's side of per-sample weighting: the weighter, its hypergradient, its records.

``RunWeighting`` sits between the mixing session (``train.session``) and the run's weighter
(``[weighting] name``, built from the registry of ``mixlab.weighting.base``): the session calls
it, and it calls only the ``Weighter`` protocol. For a weighter that trains bi-level (DWM) it
computes the factorised hypergradient from the LM's own training gradient (see
``mixlab.weighting.bilevel``; ``StepWeightingSignals.hypergradient``) and sums the weighting
model's gradients over ranks; it gathers each step's weights for the weighter's analysis.
Every rank holds the same weighter: its network is small and its update is reduced like DDP's;
with ``train.check_ranks`` a checksum of its parameters is compared across ranks after every
update.

Under several ranks or gradient accumulation the weights are normalised within each
micro-batch of each rank (mean 1 there): the unit a forward pass sees. Results then depend on
the micro-batch partition, like any per-batch normalisation; one process without
accumulation normalises over the whole batch.

The lookahead reuses the LM's training gradient (``.grad``) when the LM has no dropout: then
train and eval mode compute the same gradient. With dropout it is recomputed in eval mode
(one more forward and backward over the batch per update), so that the lookahead and the
alignments, which the engine measures in eval mode, use the same per-sample gradients: the
hypergradient identity of ``mixlab.weighting.bilevel`` holds only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from mixlab.signals.alignment import Direction, loss_gradient, trainable_parameters
from mixlab.train.distributed import all_gather_array, check_same_on_all_ranks
from mixlab.weighting.base import Weighter, WeighterContext, WeightsFn, build_weighter
from mixlab.weighting.bilevel import (
    adam_preconditioner,
    factorised_hypergradient,
    has_dropout,
    lookahead_val_gradient,
)

if TYPE_CHECKING:
    from pathlib import Path

    from mixlab.data.sampler import Batch
    from mixlab.train.signals import Session


class RunWeighting:
    """Per-sample weighting of one run (built by the session when ``weighting.name != 'none'``;
    the session has checked the weighter's ``needs`` against the driver's capabilities)."""

    def __init__(self, session: Session):
        cfg, t = session.cfg.weighting, session.cfg.train
        self.session = session
        self.name = cfg.name
        ctx = WeighterContext(
            domains=list(session.domains), vocab_size=session.data.vocab_size,
            tokenizer_sha256=session.data.manifest.tokenizer_sha256, total_steps=t.steps,
            batch_size=t.batch_size, seq_len=session.cfg.data.seq_len, seed=t.seed,
            device=session.device, rank=session.rank, world=session.world, data=session.data,
            target_probe=None if session.target is None else session.target.probe,
        )
        self.weighter: Weighter = build_weighter(cfg.name, cfg.options, ctx)

    # ---------------------------------------------------------------- the step

    def micro_weights(self, step: int, tokens: torch.Tensor, domains: torch.Tensor,
                      losses: torch.Tensor) -> torch.Tensor:
        """[b] weights of one micro-batch (on the LM's device)."""
        return self.weighter.weights(step, tokens, domains, losses).to(losses.device)

    def trains_at(self, step: int) -> bool:
        """True when the weighter updates at ``step`` (``update`` after the LM's backward)."""
        return self.weighter.trains_at(step)

    def update(self, step: int, batch: Batch, losses: torch.Tensor, factors: torch.Tensor | None,
               lr: float, micro: int) -> bool:
        """The weighter's update at ``step``; call after the LM's backward, before clipping and
        the optimizer step (``.grad`` holds the gradient of Σ f_i w_i ℓ_i / B, reduced over ranks)."""
        signals = StepWeightingSignals(self.session, step, batch.tokens, batch.domains, losses,
                                       factors, micro, lr)
        updated = self.weighter.update(step, signals)
        tr = self.session
        if tr.cfg.train.check_ranks and tr.dist.enabled:
            check_same_on_all_ranks(self._checksum(), "weighting model parameters", step, tr.dist)
        return updated

    def _checksum(self) -> np.ndarray:
        """[2] sum and sum of squares of the weighter's parameters (float64)."""
        params = self.weighter.parameters()
        if not params:
            return np.zeros(2)
        flat = torch.cat([p.detach().double().flatten().cpu() for p in params])
        return np.array([float(flat.sum()), float((flat * flat).sum())])

    def record(self, step: int, batch: Batch, domains_all: np.ndarray, weights: torch.Tensor) -> None:
        """Add this step's weights (this rank's [b]) to the analysis; ``domains_all`` [B] are
        the global batch's domains, already gathered by the loop."""
        local = weights.detach().double().cpu().numpy()
        all_w = all_gather_array(local, self.session.dist)
        self.weighter.record(step, all_w, domains_all, batch.tokens, local, batch.domains.numpy())

    def report(self, step: int) -> dict[str, Any]:
        """The weighter's values for the log line at ``step``."""
        return self.weighter.report(step)

    # ---------------------------------------------------------------- state and files

    def state_dict(self) -> dict[str, Any]:
        return {"weighter": self.weighter.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        inner = state["weighter"]
        if "val_sampler" in state:  # checkpoints written before issue 14 kept DWM's stream beside it
            inner = {**inner, "val_sampler": state["val_sampler"]}
        self.weighter.load_state_dict(inner)

    def save(self, out_dir: Path) -> None:
        """Write the weighter's files into the run dir (rank 0 only; DWM: dwm.safetensors, dwm.json)."""
        tok = self.session.data.tokenizer()
        self.weighter.save(out_dir, lambda ids: tok.decode(ids, skip_special_tokens=False))

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, **self.weighter.summary()}


@dataclass
class StepWeightingSignals:
    """``mixlab.weighting.base.WeightingSignals`` of one step, computed from the session's run."""

    session: Session
    step: int
    tokens: torch.Tensor
    """[b, T+1] this rank's slice of the batch."""
    domains: torch.Tensor
    """[b]"""
    losses: torch.Tensor
    """[b] the LM's per-sample losses (detached)."""
    factors: torch.Tensor | None
    """[b] the mixer's loss factors f_i, or None."""
    micro: int
    lr: float

    def hypergradient(self, val_tokens: torch.Tensor, weights: WeightsFn, *, eta: float,
                      precondition: bool, method: str) -> torch.Tensor:
        tr = self.session
        model = tr.model
        grads = self._lookahead_gradient(weights)
        # P = 1 / (sqrt(v̂) + ε): the lookahead is AdamW's step along the gradient (issue 13: the
        # denominator itself was passed here once, which made the step θ - η (sqrt(v̂) + ε) g).
        precond = adam_preconditioner(tr.optimizer, model) if precondition else None
        val_grad = lookahead_val_gradient(model, grads, eta, val_tokens, precond=precond, autocast=tr.autocast)
        if tr.dist.enabled:
            for g in val_grad.values():  # each rank held a slice of the validation windows
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= tr.world
        hyper = factorised_hypergradient(
            model, self.tokens, val_grad, eta, tr.cfg.train.batch_size, precond=precond,
            method=method, autocast=tr.autocast,
        )
        if self.factors is not None:  # a mixer's loss factor f_i scales sample i's share of the step
            hyper = hyper * self.factors.cpu()
        return hyper

    def _lookahead_gradient(self, weights: WeightsFn) -> Direction:
        """The gradient of the weighted batch loss ``Σ_i f_i w_i ℓ_i / B`` the lookahead steps
        along, in eval mode (float32 direction, the same on every rank).

        Without dropout it is the LM's own ``.grad`` (already reduced over ranks). With dropout
        that gradient came from train mode, through dropout masks the alignment engine cannot
        draw again (its jvp runs another attention kernel, its finite difference two forwards,
        its chunks other shapes), while the alignments and L_val(θ') are measured in eval mode;
        mixing the two is the hypergradient of no lookahead at all. Eval mode on both sides is
        exact for the deterministic lookahead, which is also the model L_val is measured on.
        """
        tr = self.session
        model = tr.model
        if not has_dropout(model):
            return {
                n: (p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                for n, p in trainable_parameters(model).items()
            }
        b, micro = self.tokens.shape[0], self.micro
        # The weights the LM's step used: those of each micro-batch again (a deterministic
        # function of the same tokens, domains and losses).
        w = torch.cat([
            weights(self.step, self.tokens[k : k + micro], self.domains[k : k + micro],
                    self.losses[k : k + micro]).float().cpu()
            for k in range(0, b, micro)
        ])
        if self.factors is not None:
            w = w * self.factors.cpu()
        # Σ over this rank's samples of f_i w_i ∇ℓ_i / b, averaged over ranks = Σ_i f_i w_i ∇ℓ_i / B,
        # as DDP averages the training gradient.
        grads = loss_gradient(model, self.tokens, w / b, autocast=tr.autocast)
        if tr.dist.enabled:
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= tr.world
        return grads

    def reduce_grads(self, net: torch.nn.Module) -> None:
        if not self.session.dist.enabled:
            return
        for p in net.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
