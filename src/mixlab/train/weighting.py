"""The session's side of per-sample weighting: validation data, the bi-level step, records.

``RunWeighting`` sits between the mixing session (``train.session``) and ``mixlab.weighting.DataWeighter``: it draws the
validation windows the weighting model optimises for, computes the factorised hypergradient
from the LM's own training gradient (see ``mixlab.weighting.bilevel``), sums the weighting
model's gradients over ranks, and gathers each step's weights for the analysis. Every rank
holds the same weighting model: the network is small and its update is reduced like DDP's;
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

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from mixlab.data.sampler import MixtureSampler
from mixlab.errors import ConfigError
from mixlab.signals.alignment import Direction, loss_gradient, trainable_parameters
from mixlab.train.distributed import all_gather_array, check_same_on_all_ranks
from mixlab.weighting.bilevel import (
    adam_preconditioner,
    factorised_hypergradient,
    has_dropout,
    lookahead_val_gradient,
)
from mixlab.weighting.dwm import DataWeighter

if TYPE_CHECKING:
    from pathlib import Path

    from mixlab.data.sampler import Batch
    from mixlab.train.signals import Session

VAL_SEED_OFFSET = 2_000_029


class RunWeighting:
    """Per-sample weighting of one run (built by the session when ``weighting.name != 'none'``)."""

    def __init__(self, session: Session):
        cfg, t = session.cfg.weighting, session.cfg.train
        self.session = session
        self.cfg = cfg
        if "full_model" not in session.provides and not cfg.frozen:
            raise ConfigError(
                "weighting.name = 'dwm' trains its weighting model from per-sample alignments, "
                "which need the whole LM on every rank (under train.parallel = 'fsdp' each rank "
                "holds a shard); use train.parallel = 'ddp', or a frozen weighting model "
                "(weighting.load + weighting.frozen = true)."
            )
        mode = cfg.validation
        if mode == "auto":
            mode = "target" if session.target is not None else "val"
        if mode == "target" and session.target is None:
            raise ConfigError("weighting.validation = 'target' needs a target set (target.path or target.domain).")
        self.mode = mode
        self.val_batch = cfg.val_batch or t.batch_size
        if self.val_batch % session.world:
            raise ConfigError(
                f"weighting.val_batch {self.val_batch} must be divisible by the number of processes {session.world}."
            )
        self.weighter = DataWeighter(
            cfg, vocab_size=session.data.vocab_size, domains=session.domains,
            tokenizer_sha256=session.data.manifest.tokenizer_sha256, total_steps=t.steps,
            device=session.device, seed=t.seed,
        )
        self.val_sampler: MixtureSampler | None = None
        if mode == "val":
            self.val_sampler = MixtureSampler(
                session.data, "val", session.cfg.data.seq_len, self.val_batch,
                t.seed + VAL_SEED_OFFSET, session.rank, session.world, session.domains,
            )

    # ---------------------------------------------------------------- the step

    def micro_weights(self, step: int, tokens: torch.Tensor, domains: torch.Tensor,
                      losses: torch.Tensor) -> torch.Tensor:
        """[b] weights of one micro-batch (on the LM's device)."""
        return self.weighter.weights(tokens, domains, losses, step).to(losses.device)

    def val_tokens(self, step: int) -> torch.Tensor:
        """This rank's share [val_batch / world, T+1] of the validation windows for ``step``."""
        if self.val_sampler is not None:
            m = len(self.session.domains)
            return self.val_sampler.next_batch(weights=np.full(m, 1.0 / m)).tokens
        probe = self.session.target.probe  # type: ignore[union-attr]
        # Seeded by the step, so it needs no state to resume exactly.
        rng = np.random.default_rng([self.session.cfg.train.seed, 13, step])
        idx = rng.integers(0, probe.shape[0], self.val_batch)
        per = self.val_batch // self.session.world
        return probe[torch.from_numpy(idx[self.session.rank * per : (self.session.rank + 1) * per])]

    def update(self, step: int, batch: Batch, losses: torch.Tensor, factors: torch.Tensor | None,
               lr: float, micro: int) -> bool:
        """The bi-level update at ``step``; call after the LM's backward, before clipping and the
        optimizer step (``.grad`` holds the gradient of Σ f_i w_i ℓ_i / B, reduced over ranks)."""
        tr = self.session
        model = tr.model
        grads = self._lookahead_gradient(step, batch, losses, factors, micro)
        eta = self.cfg.lookahead_lr or lr
        # P = 1 / (sqrt(v̂) + ε): the lookahead is AdamW's step along the gradient (issue 13: the
        # denominator itself was passed here once, which made the step θ - η (sqrt(v̂) + ε) g).
        precond = adam_preconditioner(tr.optimizer, model) if self.cfg.precondition else None
        val_grad = lookahead_val_gradient(
            model, grads, eta, self.val_tokens(step), precond=precond, autocast=tr.autocast
        )
        if tr.dist.enabled:
            for g in val_grad.values():  # each rank held a slice of the validation windows
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= tr.world
        hyper = factorised_hypergradient(
            model, batch.tokens, val_grad, eta, tr.cfg.train.batch_size, precond=precond,
            method=self.cfg.method, autocast=tr.autocast,
        )
        if factors is not None:  # a mixer's loss factor f_i scales sample i's share of the step
            hyper = hyper * factors.cpu()
        updated = self.weighter.update(
            hyper, batch.tokens, batch.domains, losses, step, micro, self._sum_grads
        )
        if tr.cfg.train.check_ranks and tr.dist.enabled:
            check_same_on_all_ranks(self._checksum(), "weighting model parameters", step, tr.dist)
        return updated

    def _lookahead_gradient(self, step: int, batch: Batch, losses: torch.Tensor,
                            factors: torch.Tensor | None, micro: int) -> Direction:
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
        b = batch.tokens.shape[0]
        # The weights the LM's step used: micro_weights of each micro-batch again (a
        # deterministic function of the same tokens, domains and losses).
        w = torch.cat([
            self.weighter.weights(batch.tokens[k : k + micro], batch.domains[k : k + micro],
                                  losses[k : k + micro], step).float().cpu()
            for k in range(0, b, micro)
        ])
        if factors is not None:
            w = w * factors.cpu()
        # Σ over this rank's samples of f_i w_i ∇ℓ_i / b, averaged over ranks = Σ_i f_i w_i ∇ℓ_i / B,
        # as DDP averages the training gradient.
        grads = loss_gradient(model, batch.tokens, w / b, autocast=tr.autocast)
        if tr.dist.enabled:
            for g in grads.values():
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= tr.world
        return grads

    def _checksum(self) -> np.ndarray:
        """[2] sum and sum of squares of the weighting model's parameters (float64)."""
        flat = torch.cat([p.detach().double().flatten().cpu() for p in self.weighter.net.parameters()])
        return np.array([float(flat.sum()), float((flat * flat).sum())])

    def _sum_grads(self, net: torch.nn.Module) -> None:
        if not self.session.dist.enabled:
            return
        for p in net.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def record(self, step: int, batch: Batch, domains_all: np.ndarray, weights: torch.Tensor) -> None:
        """Add this step's weights (this rank's [b]) to the analysis; ``domains_all`` [B] are
        the global batch's domains, already gathered by the loop."""
        local = weights.detach().double().cpu().numpy()
        all_w = all_gather_array(local, self.session.dist)
        self.weighter.record(step, all_w, domains_all, batch.tokens, local, batch.domains.numpy())

    # ---------------------------------------------------------------- state and files

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weighter": self.weighter.state_dict()}
        if self.val_sampler is not None:
            out["val_sampler"] = self.val_sampler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weighter.load_state_dict(state["weighter"])
        if self.val_sampler is not None:
            self.val_sampler.load_state_dict(state["val_sampler"])

    def save(self, out_dir: Path) -> None:
        """Write OUT/dwm.safetensors and OUT/dwm.json (rank 0 only)."""
        tok = self.session.data.tokenizer()
        self.weighter.save(out_dir, lambda ids: tok.decode(ids, skip_special_tokens=False))

    def summary(self) -> dict[str, Any]:
        w = self.weighter
        return {"name": self.cfg.name, "updates": w.updates, "skipped_updates": w.skipped,
                "scheduled_updates": w.training_updates, "validation": self.mode,
                "loaded_from": w.loaded_from, "frozen": self.cfg.frozen}
