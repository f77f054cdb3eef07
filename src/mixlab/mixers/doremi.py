"""DoReMi: domain weights from a proxy run that up-weights domains with high excess loss.

Xie et al., "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS
2023 (arXiv 2305.10429); reference code sangmichaelxie/doremi.

The full procedure has three stages, each an ordinary mixlab run:

1. **Reference**: train a small model on the reference mixture (stratified, or natural), e.g.
   ``mixlab train --set mixer.name=stratified``.
2. **Proxy** (this mixer): train a proxy model of the same size with ``mixer.name = "doremi"``
   and ``mixer.reference = <reference run dir>``. At every update the excess loss of each
   domain drives a multiplicative-weights step on the domain weights α; with the published
   ``sampling = "uniform"`` the proxy samples uniformly and its loss is re-weighted by α (the
   group-DRO objective), with ``"alpha"`` it samples by α instead. The *output* of the stage is
   the average of α over the proxy run; ``plan(total_steps)`` returns it, so the run's
   ``summary.json`` ``weights_final`` holds it.
3. **Final**: train the real (larger) model on those weights, e.g. ``mixer.name = "fixed"`` with
   the weights, or ``aioli`` with ``prior_run = <proxy run dir>``.

The proxy's steps are counted as ``extra_steps`` by whoever chains the stages; inside this run
they are ordinary steps.

Update (every ``update_every`` steps; 0-based step s updates when (s + 1) % update_every == 0):

    s_i    = mean over domain i's tokens in the batch of max(ℓ_proxy - ℓ_ref, 0)   (per token)
    log α ← log α + η s ;  α ← softmax(log α)  (renormalise)
    α     ← (1 - ε) α + ε / m
    ᾱ     ← running mean of α over updates   (the output)

The clip is per token, then the mean over the domain's tokens, as in the paper and the reference
(sangmichaelxie/doremi at 7cde52d, ``doremi/trainer.py:252``: ``torch.clip(scores[domain_mask]
[perdomain_scores_mask], min=0).mean()`` over the domain's per-token excess losses): a domain
where the proxy is much worse on some tokens and better on others has a large score, although
its mean excess may be 0. ``signals.excess_losses()`` gives these per-domain means (see
``mixlab.train.signals``). ``clip = "domain"`` is mixlab's earlier rule, kept by name: clip the
difference of the per-domain mean losses, max(mean ℓ_proxy - mean ℓ_ref, 0) (``signals
.train_losses()`` before loss weighting, ``signals.reference_losses()``); it is never larger
than the per-token score and can pick the opposite winner.

With ``update_every > 1`` s_i is the sample-weighted mean of the per-step s_i over the steps
since the last update (every sample has the same number of tokens, so this is the token mean,
as the reference's mean over its accumulated micro-batches). A domain with no sample since the
last update (or a non-finite loss) keeps its previous s_i, as in the published code. The
published code updates α from the current batch before that batch's backward pass; here the
update follows the step, so the loss of step t is weighted by the α of step t - 1.

What it does with an unlearnable domain (random or shuffled tokens): the score is the proxy's
excess over the reference, not the loss, so a high loss earns nothing by itself; but the
per-token excess is >= 0 and stays positive wherever the two models' token losses differ, so
nothing drives such a domain down either (in a tiny 80-step run with a shuffled-token copy of a
domain the output gave it 0.07 of the mass and its last α was 0.49). DoReMi is not a filter
for unlearnable data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, register, softmax

# ---------------------------------------------------------------------------------------------
# Pure update rules.


def excess_losses(train: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[m] max(train - reference, 0); NaN where either loss is NaN (domain absent)."""
    diff = np.asarray(train, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(diff), np.nan, np.maximum(diff, 0.0))


def clipped_token_excess(proxy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[n] per-sample mean over tokens of max(proxy - reference, 0), from per-token losses
    ``proxy`` and ``reference`` [n, T] (the reference clips every token, ``doremi/trainer.py
    :252``); NaN for a sample with a NaN token loss."""
    diff = np.asarray(proxy, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if diff.ndim != 2:
        raise ValueError(f"per-token losses must be [n, T], got shape {diff.shape}.")
    with np.errstate(invalid="ignore"):
        return np.maximum(diff, 0.0).mean(axis=1)  # NaN propagates through maximum and mean


def doremi_update(alpha: np.ndarray, scores: np.ndarray, eta: float, eps: float) -> np.ndarray:
    """One DoReMi step: α ∝ α exp(η s) in log space, then mixed with uniform: (1 - ε) α + ε/m."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(alpha, dtype=np.float64)) + eta * np.asarray(scores)
    a = softmax(logits)
    return (1.0 - eps) * a + eps / a.size


def running_mean(mean: np.ndarray, value: np.ndarray, count: int) -> np.ndarray:
    """Mean after adding ``value`` as the ``count``-th item (count >= 1)."""
    return (np.asarray(mean) * (count - 1) + np.asarray(value)) / count


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("doremi")
class DoReMi(Mixer):
    """DoReMi proxy run: group-DRO weights α from the excess loss over a reference model."""

    dynamic = True
    needs_reference = True
    own_A = (("excess", "DoReMi: diag(excess loss of its latest update)"),)

    @classmethod
    def loss_mixture(cls, options: dict[str, Any]) -> tuple[str, str] | None:
        """With uniform sampling the loss is weighted by α (logged as ``alpha``; the α logged at
        a step is the one the next step uses)."""
        if options.get("sampling", "uniform") != "uniform":
            return None
        return "alpha", "DoReMi's α (logged; it samples uniformly and weights the loss by α)"

    @dataclass
    class Config:
        eta: float = 1.0
        """Step size of the multiplicative update of log α (paper and code: 1)."""
        eps: float = 1e-3
        """Smoothing with uniform after every update, α ← (1-ε)α + ε/m (paper: 1e-3; the
        repository's run scripts use 1e-4)."""
        update_every: int = 1
        """Update α every this many steps (published: every step)."""
        sampling: Literal["uniform", "alpha"] = "uniform"
        """'uniform': sample uniformly and weight the loss by α (published); 'alpha': sample
        domains by α and leave the loss unweighted."""
        clip: Literal["token", "domain"] = "token"
        """'token': clip every token's excess loss at 0, then average per domain (published,
        ``doremi/trainer.py:252``); 'domain': clip the per-domain mean excess (mixlab's rule
        before issue 13)."""

        def __post_init__(self) -> None:
            if not (np.isfinite(self.eta) and self.eta >= 0):
                raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}.")
            if not 0.0 <= self.eps <= 1.0:
                raise ConfigError(f"eps must be in [0, 1], got {self.eps}.")
            if self.update_every < 1:
                raise ConfigError(f"update_every must be >= 1, got {self.update_every}.")
            if self.clip not in ("token", "domain"):
                raise ConfigError(f"clip {self.clip!r} is not one of 'token', 'domain'.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m = ctx.m
        self.uniform = np.full(m, 1.0 / m)
        self.alpha = self.uniform.copy()
        self.scores = np.zeros(m)
        self.alpha_avg = self.uniform.copy()
        self.updates = 0
        # Sample-weighted sums of the per-step excess since the last update.
        self.acc_sum = np.zeros(m)
        self.acc_n = np.zeros(m)
        self.wants_token_losses = config.clip == "token"
        """Tells a trainer that keeps the per-token losses of its training forward to hand them
        to the signals (``excess_losses`` then needs no second forward of the proxy)."""

    def plan(self, step: int) -> Plan:
        if step >= self.ctx.total_steps:  # after the run: the proxy's output, the average α
            return Plan(weights=self.alpha_avg.copy())
        if self.config.sampling == "uniform":
            return Plan(weights=self.uniform.copy(), loss_weights=self.alpha.copy())
        return Plan(weights=self.alpha.copy())

    def observe(self, step: int, signals: Signals) -> None:
        counts = np.asarray(signals.train_counts(), dtype=np.float64)
        if self.config.clip == "token":
            excess = np.asarray(signals.excess_losses(), dtype=np.float64)
        else:
            excess = excess_losses(signals.train_losses(), signals.reference_losses())
        seen = (counts > 0) & np.isfinite(excess)
        self.acc_sum[seen] += counts[seen] * excess[seen]
        self.acc_n[seen] += counts[seen]
        if (step + 1) % self.config.update_every:
            return
        fresh = self.acc_n > 0
        self.scores = np.where(fresh, self.acc_sum / np.maximum(self.acc_n, 1.0), self.scores)
        self.alpha = doremi_update(self.alpha, self.scores, self.config.eta, self.config.eps)
        self.updates += 1
        self.alpha_avg = running_mean(self.alpha_avg, self.alpha, self.updates)
        self.acc_sum[:] = 0.0
        self.acc_n[:] = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "alpha_avg": self.alpha_avg.tolist(),
            "excess": self.scores.tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "scores": self.scores.tolist(),
            "alpha_avg": self.alpha_avg.tolist(),
            "updates": self.updates,
            "acc_sum": self.acc_sum.tolist(),
            "acc_n": self.acc_n.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha = np.asarray(state["alpha"], dtype=np.float64)
        if alpha.shape != (self.ctx.m,):
            raise CheckpointError(
                f"doremi state has {alpha.size} domains, this run has {self.ctx.m}."
            )
        self.alpha = alpha
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        self.alpha_avg = np.asarray(state["alpha_avg"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.acc_sum = np.asarray(state["acc_sum"], dtype=np.float64)
        self.acc_n = np.asarray(state["acc_n"], dtype=np.float64)
