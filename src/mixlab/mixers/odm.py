"""ODM: online data mixing as an adversarial multi-armed bandit (EXP3), one arm per domain.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training",
arXiv 2312.02406; reference code alon-albalak/online-data-mixing at edbfdad
(``megatron/data/data_sampling_utils.py``; the README names ``SmoothedMeanWeightUpdater``, line
455, as the paper's implementation). Every ``smoothed_mean`` run script
(``scripts/train_1B_ema*.sh``, ``train_3B_ema_0.5smoothing.sh``, ...) sets
``--mixed_minibatches true``, where ``megatron/training.py:1267`` calls the updater's
``group_update`` once per step with each domain's mean loss in the batch (the exp3 scripts run
both that and one-domain batches). mixlab's batches mix domains the same way, so the variants
follow ``group_update``.

After step t (1-based, t = step + 1; the reference increments ``iteration`` before the update)
with sampling distribution π:

    ε_prev  = the ε of the previous update (1/m before the first one)
    ε_t     = min(1/m, sqrt(ln m / (m t)))
    r_k     = mean training loss of domain k's samples in the batch (domains in the batch)

    "smoothed" (SmoothedMeanWeightUpdater.group_update, data_sampling_utils.py:501-528):
        R_k ← α R_k + (1 - α) exp(r_k)                 no scaling, no importance weight
        π_k = (1 - m ε_t) · R_k / Σ_j R_j + ε_t        (the reference multiplies R by ε_prev
                                                        in the numerator and denominator: it
                                                        cancels, so ε_prev plays no role)
    "exp3" (the updaters' EXP3 form, Exp3WeightUpdater, data_sampling_utils.py:354-418):
        x_k     = (n_k / b) · scale · r_k / π_k        importance-weighted reward (scale: /10)
        R̂_k ← R̂_k + x_k
        π_k = (1 - m ε_t) · exp(ε_prev R̂_k) / Σ_j exp(ε_prev R̂_j) + ε_t
    "smoothed_iw" (mixlab's earlier "smoothed", kept by name): the exp3 form with
        R̂_k ← α R̂_k + (1 - α) x_k for every domain in the batch (others kept).

n_k is the number of the b samples of the batch drawn from domain k. With one sample per step
(b = 1, the published one-domain minibatch) x_k is exactly the EXP3 estimate r/π_k of the
sampled arm; with b samples drawn i.i.d. from π it is the average of the b per-sample estimates,
so E[x_k] = r_k still holds (E[n_k / b] = π_k).

ε_prev is the ε the reference's updater stored at its previous update (``self.prev_eps =
self.eps``), starting from 1/m: the first update after ``warmup_steps`` uses 1/m, not ε_{t-1}
(the reference's warm-up loop, ``megatron/training.py:1047``, never calls the updater).

What "smoothed" does: R_k is a moving average of exp(loss), so π is (1 - mε) times a softmax
of (smoothed) domain losses plus exploration: the domain with the highest training loss gets
the most samples, and a domain whose loss cannot go down (random tokens) keeps the largest share
for the whole run. That is the method's semantics (loss = reward), not a defect of this code.
A domain not yet seen has R_k = 0 and gets only the exploration mass ε_t.

The smoothed estimate is held in log space (log R_k, logaddexp update), so a loss of any size
gives a finite π; the EXP3 softmax is shifted by its max for the same reason. A domain whose loss
is NaN (absent, or a non-finite step) contributes no reward. During the first ``warmup_steps``
steps the mixture stays uniform and nothing is accumulated (the published scripts use 2000); t
keeps counting the run's steps, as in the reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, register, softmax

# ---------------------------------------------------------------------------------------------
# Pure update rules.


def exploration_rate(t: int, m: int) -> float:
    """ε_t = min(1/m, sqrt(ln m / (m t))) for t >= 1; ε_0 = 1/m."""
    if t <= 0:
        return 1.0 / m
    return min(1.0 / m, math.sqrt(math.log(m) / (m * t)))


def importance_rewards(
    losses: np.ndarray, counts: np.ndarray, probs: np.ndarray, scale: float
) -> np.ndarray:
    """[m] x_k = (n_k / b) * scale * loss_k / π_k; 0 for absent domains or non-finite losses."""
    losses = np.asarray(losses, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    b = counts.sum()
    ok = (counts > 0) & np.isfinite(losses) & (probs > 0)
    if b <= 0:
        return np.zeros_like(losses)
    x = np.zeros_like(losses)
    x[ok] = (counts[ok] / b) * scale * losses[ok] / probs[ok]
    return x


def smoothed_update(
    estimates: np.ndarray, rewards: np.ndarray, present: np.ndarray, smoothing: float
) -> np.ndarray:
    """R̂_k ← α R̂_k + (1 - α) x_k where ``present``; unchanged elsewhere (all [m])."""
    R = np.asarray(estimates, dtype=np.float64)
    return np.where(present, smoothing * R + (1.0 - smoothing) * np.asarray(rewards), R)


def smoothed_exp_update(
    log_estimates: np.ndarray, losses: np.ndarray, present: np.ndarray, smoothing: float
) -> np.ndarray:
    """log R_k of R_k ← α R_k + (1 - α) exp(loss_k) where ``present`` (else unchanged), all [m].

    In log space: log R ← logaddexp(log α + log R, log(1 - α) + loss), so R = 0 (log R = -inf,
    a domain never seen) and losses of any size stay exact and finite where the reference's
    ``math.exp(reward)`` (data_sampling_utils.py:511) would overflow.
    """
    logR = np.asarray(log_estimates, dtype=np.float64)
    loss = np.where(present, np.asarray(losses, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore"):
        log_a = math.log(smoothing) if smoothing > 0 else -math.inf
    new = np.logaddexp(log_a + logR, math.log1p(-smoothing) + loss)
    return np.where(present, new, logR)


def linear_probabilities(log_estimates: np.ndarray, eps_now: float) -> np.ndarray:
    """π = (1 - m ε_t) R / Σ_j R_j + ε_t from log R [m] (SmoothedMeanWeightUpdater.group_update,
    data_sampling_utils.py:515-521); uniform exploitation part when no R is positive yet."""
    logR = np.asarray(log_estimates, dtype=np.float64)
    m = logR.size
    if not np.any(np.isfinite(logR)):
        share = np.full(m, 1.0 / m)
    else:
        share = softmax(np.where(np.isfinite(logR), logR, -np.inf))  # R / Σ R, exp(-inf) = 0
    return (1.0 - m * eps_now) * share + eps_now


def exp3_probabilities(estimates: np.ndarray, eps_prev: float, eps_now: float) -> np.ndarray:
    """π = (1 - m ε_t) softmax(ε_{t-1} R̂) + ε_t."""
    R = np.asarray(estimates, dtype=np.float64)
    # Clipping keeps an overflowed estimate (inf) from turning the softmax into NaN.
    z = np.clip(eps_prev * R, -1e300, 1e300)
    return (1.0 - R.size * eps_now) * softmax(z) + eps_now


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("odm")
class ODM(Mixer):
    """ODM: EXP3 bandit over domains with the training loss as reward."""

    dynamic = True

    @dataclass
    class Config:
        variant: Literal["exp3", "smoothed", "smoothed_iw"] = "exp3"
        """'exp3': cumulative importance-weighted reward (reference ``Exp3WeightUpdater``);
        'smoothed': the paper's implementation as published (``SmoothedMeanWeightUpdater``):
        moving average of exp(loss), π ∝ it; 'smoothed_iw': moving average of the
        importance-weighted reward inside the EXP3 softmax (mixlab's rule before issue 13)."""
        reward_scale: float = 0.1
        """'exp3' / 'smoothed_iw': reward = reward_scale × the domain's mean training loss
        (reference Exp3WeightUpdater: loss / 10). 'smoothed' uses the raw loss (as published)."""
        smoothing: float = 0.9
        """α of the smoothed variants: weight of the previous estimate (reference default 0.9;
        the reference 1B scripts also ran 0.5)."""
        warmup_steps: int = 0
        """Steps on the uniform mixture before the bandit starts (published scripts: 2000 of
        100k-step runs)."""

        def __post_init__(self) -> None:
            if self.variant not in ("exp3", "smoothed", "smoothed_iw"):
                raise ConfigError(
                    f"variant {self.variant!r} is not one of 'exp3', 'smoothed', 'smoothed_iw'."
                )
            if not (np.isfinite(self.reward_scale) and self.reward_scale > 0):
                raise ConfigError(
                    f"reward_scale must be a finite number > 0, got {self.reward_scale}."
                )
            if not 0.0 <= self.smoothing < 1.0:
                raise ConfigError(f"smoothing must be in [0, 1), got {self.smoothing}.")
            if self.warmup_steps < 0:
                raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m = ctx.m
        # exp3 / smoothed_iw: R̂ (starts at 0). smoothed: log R (R starts at 0: log R = -inf).
        self.estimates = np.full(m, -np.inf) if config.variant == "smoothed" else np.zeros(m)
        self.p = np.full(m, 1.0 / m)
        self.eps = 1.0 / m
        """ε of the last update (the reference updater's ``self.eps``); 1/m before the first."""

    def plan(self, step: int) -> Plan:
        return Plan(weights=self.p.copy())

    def observe(self, step: int, signals: Signals) -> None:
        t = step + 1
        cfg = self.config
        if t <= cfg.warmup_steps:
            return
        m = self.ctx.m
        counts = np.asarray(signals.train_counts(), dtype=np.float64)
        losses = np.asarray(signals.train_losses(), dtype=np.float64)
        present = (counts > 0) & np.isfinite(losses)
        eps_prev, eps_now = self.eps, exploration_rate(t, m)
        if cfg.variant == "smoothed":
            self.estimates = smoothed_exp_update(self.estimates, losses, present, cfg.smoothing)
            self.p = linear_probabilities(self.estimates, eps_now)
        else:
            x = importance_rewards(losses, counts, self.p, cfg.reward_scale)
            if cfg.variant == "exp3":
                self.estimates = self.estimates + x
            else:
                self.estimates = smoothed_update(self.estimates, x, present, cfg.smoothing)
            self.p = exp3_probabilities(self.estimates, eps_prev, eps_now)
        self.eps = eps_now

    def report(self) -> dict[str, Any]:
        est = self.estimates
        if self.config.variant == "smoothed":
            # R = exp(log R), finite for strict JSON (0 for a domain not seen yet).
            with np.errstate(over="ignore"):
                est = np.minimum(np.exp(est), np.finfo(np.float64).max)
        return {"p": self.p.tolist(), "reward_estimates": est.tolist(), "eps": self.eps}

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": self.estimates.tolist(), "p": self.p.tolist(), "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = np.asarray(state["p"], dtype=np.float64)
        if p.shape != (self.ctx.m,):
            raise CheckpointError(f"odm state has {p.size} domains, this run has {self.ctx.m}.")
        if "eps" not in state:
            raise CheckpointError(
                "odm state has no 'eps' (a checkpoint from before the exploration rate was kept "
                "in the state); restart the run."
            )
        self.p = p
        self.estimates = np.asarray(state["estimates"], dtype=np.float64)
        self.eps = float(state["eps"])
