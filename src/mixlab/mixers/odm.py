"""ODM: online data mixing as an adversarial multi-armed bandit (EXP3), one arm per domain.

Albalak, Pan, Raffel, Wang, "Efficient Online Data Mixing For Language Model Pre-Training",
arXiv 2312.02406; reference code alon-albalak/online-data-mixing
(``megatron/data/data_sampling_utils.py``).

The reward of a domain is its training loss (a domain the model still finds hard is worth
sampling), scaled by ``reward_scale`` (the reference ``Exp3WeightUpdater`` divides the loss by
10). After step t (1-based, t = step + 1) with sampling distribution π:

    ε_t     = min(1/m, sqrt(ln m / (m t))),   ε_0 = 1/m
    x_k     = (n_k / b) · r_k / π_k           importance-weighted reward of the batch
    exp3:     R̂_k ← R̂_k + x_k
    smoothed: R̂_k ← α R̂_k + (1 - α) x_k      for every domain k in the batch (others kept)
    π_k     = (1 - m ε_t) · exp(ε_{t-1} R̂_k) / Σ_j exp(ε_{t-1} R̂_j) + ε_t

n_k is the number of the b samples of the batch drawn from domain k and r_k their mean scaled
loss. With one sample per step (b = 1, the published one-domain minibatch) x_k is exactly the
EXP3 estimate r/π_k of the sampled arm; with b samples drawn i.i.d. from π it is the average of
the b per-sample estimates, so E[x_k] = r_k still holds (E[n_k / b] = π_k).

"smoothed" is the smoothed-mean estimator of the ODM paper (the reference README names its
``SmoothedMeanWeightUpdater`` class as the paper's implementation; run scripts
``train_1B_ema*.sh``, ``data_sampling_method = smoothed_mean``): instead of summing all past
importance-weighted rewards, each arm keeps an exponential moving average of them with
smoothing factor α, so the estimate tracks the non-stationary loss rather than the whole
history. Note that R̂ then stays of the order of r/π while ε_{t-1} → 0, so π drifts back toward
uniform late in long runs; with "exp3" R̂ grows like t and π concentrates.

The softmax is computed in log space (shifted by the max), so R̂ of any size gives a finite π.
A domain whose loss is NaN (absent, or a non-finite step) contributes no reward. During the
first ``warmup_steps`` steps the mixture stays uniform and nothing is accumulated (the published
scripts use 2000); t keeps counting the run's steps, as in the reference code.
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
    """R̂_k ← α R̂_k + (1 - α) x_k where ``present``; unchanged elsewhere."""
    R = np.asarray(estimates, dtype=np.float64)
    return np.where(present, smoothing * R + (1.0 - smoothing) * np.asarray(rewards), R)


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
        variant: Literal["exp3", "smoothed"] = "exp3"
        """'exp3': cumulative importance-weighted reward (reference ``Exp3WeightUpdater``);
        'smoothed': exponential moving average of it (the paper's smoothed mean)."""
        reward_scale: float = 0.1
        """Reward = reward_scale × the domain's mean training loss (reference code: loss / 10)."""
        smoothing: float = 0.9
        """α of the 'smoothed' variant: weight of the previous estimate (0.9 is the default of the
        SmoothedMeanWeightUpdater code we could read; the reference 1B scripts also ran 0.5)."""
        warmup_steps: int = 0
        """Steps on the uniform mixture before the bandit starts (published scripts: 2000 of
        100k-step runs)."""

        def __post_init__(self) -> None:
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
        self.estimates = np.zeros(ctx.m)
        self.p = np.full(ctx.m, 1.0 / ctx.m)

    def plan(self, step: int) -> Plan:
        return Plan(weights=self.p.copy())

    def observe(self, step: int, signals: Signals) -> None:
        t = step + 1
        if t <= self.config.warmup_steps:
            return
        m = self.ctx.m
        counts = np.asarray(signals.train_counts(), dtype=np.float64)
        losses = np.asarray(signals.train_losses(), dtype=np.float64)
        x = importance_rewards(losses, counts, self.p, self.config.reward_scale)
        if self.config.variant == "exp3":
            self.estimates = self.estimates + x
        else:
            present = (counts > 0) & np.isfinite(losses)
            self.estimates = smoothed_update(self.estimates, x, present, self.config.smoothing)
        self.p = exp3_probabilities(
            self.estimates, exploration_rate(t - 1, m), exploration_rate(t, m)
        )

    def report(self) -> dict[str, Any]:
        return {"p": self.p.tolist(), "reward_estimates": self.estimates.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"estimates": self.estimates.tolist(), "p": self.p.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = np.asarray(state["p"], dtype=np.float64)
        if p.shape != (self.ctx.m,):
            raise CheckpointError(f"odm state has {p.size} domains, this run has {self.ctx.m}.")
        self.p = p
        self.estimates = np.asarray(state["estimates"], dtype=np.float64)
