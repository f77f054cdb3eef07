"""DoGE: domain reweighting with generalisation estimation, on the alignment engine.

Fan, Pagliardini, Jaggi, "DoGE: Domain Reweighting with Generalization Estimation" (ICML 2024,
arXiv 2310.15393); reference code Olivia-fsm/DoGE (``DoGETrainer.update_domain_weights``).
A proxy model trains on Σ_i α_i ℓ_i while α follows how much a step on each domain reduces
the objective. Every ``update_every`` steps (0-based step s updates when (s + 1) %
update_every == 0), with learning rate lr_t of the step:

    W_i = <g_i, v>          v = Σ_j g_j ("generic": the sum of the domain gradients), or
                            v = g_target ("target": the target's probe gradient)
    s_i = clip(lr_t · W_i / (mean_i ||g_i|| + 1e-6), lr_t · dw_min, lr_t · dw_max)
    log α ← log α + s / μ ;  α ← softmax(log α) ;  α ← (1 - ε) α + ε / m
    ᾱ ← running mean of α over updates     (the proxy's output, returned by plan(total_steps))

The proxy's update Σ_i α_i g_i is loss re-weighting: with ``apply = "loss"`` (published) the
batch is drawn uniformly and a sample of domain i has its loss multiplied by α_i / q_i
(``Plan.loss_weights``); ``apply = "sample"`` draws domains by α instead. Defaults follow the
paper/DESIGN.md: μ = 0.01 (the code's default is 0.05), dw_min = 0, dw_max = 5, ε = 0.

How the engine computes it (no per-domain backward, no gradient buffers):
- W_i is the mean over domain i's samples of the per-sample alignment ``<∇ℓ_x, v>`` on a
  measurement batch with an equal number of samples per domain (one jvp, or two forwards).
- "generic": v = Σ_j ĝ_j is one backward over a *second*, independent measurement batch (each
  domain's mean loss summed). So W_i estimates Σ_j <g_i, g_j> over all j, the first-order drop
  of Σ_j ℓ_j from a step on domain i (the paper's generalisation estimate). The reference code
  drops the j = i term, because there both factors come from the same batch and <ĝ_i, ĝ_i>
  carries the batch noise ||ĝ_i - g_i||²; with independent batches the cross term
  <ĝ_i, ĝ'_i> has no noise bias (its mean is ||g_i||²), and it cannot be separated from the sum
  without one backward per domain, so it is kept.
- mean_i ||g_i|| (the published normaliser) comes from R = ``norm_probes`` seeded Gaussian
  directions z_r measured on the same batch: <ĝ_i, z_r> ~ N(0, ||ĝ_i||²), so
  ||ĝ_i|| ≈ sqrt(mean_r <ĝ_i, z_r>²) / c_R with c_R = E[sqrt(χ²_R / R)] (unbiased per domain).
- The reference code clips each domain gradient to the trainer's max grad norm before taking
  inner products (a side effect of its clipping call); the engine has no per-domain gradient
  to clip, so that is not reproduced.
A domain without a sample in a measurement keeps its previous score (as in the reference code,
whose per-domain gradient buffer keeps the last gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, register, softmax
from mixlab.signals.alignment import group_mean, stratified_counts

# ---------------------------------------------------------------------------------------------
# Pure update rules.


def chi_mean(r: int) -> float:
    """E[sqrt(χ²_r / r)] = sqrt(2 / r) Γ((r + 1) / 2) / Γ(r / 2): the mean of the root-mean-square
    of r standard normals (0.7979 for r = 1, 0.9400 for r = 4, → 1)."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}.")
    return math.sqrt(2.0 / r) * math.exp(math.lgamma((r + 1) / 2) - math.lgamma(r / 2))


def gradient_norms(probe_values: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """[k] unbiased estimates of ||ĝ_i|| (the norm of group i's mean-loss gradient) from
    per-sample probe alignments ``probe_values`` [R, N] along R Gaussian directions;
    NaN for a group without samples."""
    pv = np.asarray(probe_values, dtype=np.float64)
    if pv.ndim != 2 or pv.shape[0] < 1:
        raise ValueError(f"probe_values must be [R >= 1, N], got shape {pv.shape}.")
    proj = np.stack([group_mean(row, groups, k) for row in pv])  # [R, k]: <ĝ_i, z_r>
    return np.sqrt(np.mean(proj**2, axis=0)) / chi_mean(pv.shape[0])


def doge_scores(
    w: np.ndarray, mean_norm: float, lr: float, dw_min: float, dw_max: float
) -> np.ndarray:
    """[m] s = clip(lr · W / (mean_norm + 1e-6), lr · dw_min, lr · dw_max) (NaN stays NaN)."""
    s = lr * np.asarray(w, dtype=np.float64) / (mean_norm + 1e-6)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(s), np.nan, np.clip(s, lr * dw_min, lr * dw_max))


def doge_update(alpha: np.ndarray, scores: np.ndarray, mu: float, eps: float) -> np.ndarray:
    """α' = (1 - ε) softmax(log α + s / μ) + ε / m."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(alpha, dtype=np.float64)) + np.asarray(scores) / mu
    a = softmax(logits)
    return (1.0 - eps) * a + eps / a.size


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("doge")
class DoGE(Mixer):
    """DoGE proxy run: α up-weights domains whose gradient helps the others (or a target)."""

    dynamic = True

    @dataclass
    class Config:
        objective: Literal["generic", "target"] = "generic"
        """'generic': align each domain with the sum of the domain gradients (generalisation to
        the training domains); 'target': with the target's probe gradient (out-of-domain)."""
        mu: float = 0.01
        """μ, the Bregman step: log α ← log α + s / μ (paper: 0.01; reference code default 0.05)."""
        dw_min: float = 0.0
        """Scores are clipped below at lr_t · dw_min."""
        dw_max: float = 5.0
        """Scores are clipped above at lr_t · dw_max."""
        eps: float = 0.0
        """Smoothing with uniform after every update, α ← (1-ε)α + ε/m (reference default 0)."""
        update_every: int = 1
        """Update α every this many steps (published: every step)."""
        apply: Literal["loss", "sample"] = "loss"
        """'loss': sample uniformly and weight the loss by α (the published proxy update
        Σ α_i g_i); 'sample': sample domains by α."""
        method: Literal["jvp", "fd"] = "jvp"
        """Alignment engine: 'jvp' (exact) or 'fd' (finite difference)."""
        align_samples: int = 0
        """Samples per measurement (0 = the global batch size), split evenly over the domains;
        the 'generic' direction draws the same number again for v."""
        norm_probes: int = 4
        """Gaussian directions used to estimate mean_i ||g_i|| (each costs one more jvp)."""

        def __post_init__(self) -> None:
            if not (np.isfinite(self.mu) and self.mu > 0):
                raise ConfigError(f"mu must be a finite number > 0, got {self.mu}.")
            if not (np.isfinite(self.dw_min) and np.isfinite(self.dw_max) and self.dw_min <= self.dw_max):
                raise ConfigError(f"need finite dw_min <= dw_max, got {self.dw_min}, {self.dw_max}.")
            if not 0.0 <= self.eps <= 1.0:
                raise ConfigError(f"eps must be in [0, 1], got {self.eps}.")
            if self.update_every < 1 or self.norm_probes < 1 or self.align_samples < 0:
                raise ConfigError("update_every and norm_probes must be >= 1, align_samples >= 0.")
            choices = {"objective": ("generic", "target"), "apply": ("loss", "sample"),
                       "method": ("jvp", "fd")}
            for name, allowed in choices.items():
                if getattr(self, name) not in allowed:
                    raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {allowed}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m = ctx.m
        self.uniform = np.full(m, 1.0 / m)
        self.alpha = self.uniform.copy()
        self.alpha_avg = self.uniform.copy()
        self.scores = np.zeros(m)
        self.updates = 0
        self.mean_norm = 0.0

    def plan(self, step: int) -> Plan:
        if step >= self.ctx.total_steps:  # after the run: the proxy's output, the average α
            return Plan(weights=self.alpha_avg.copy())
        if self.config.apply == "loss":
            return Plan(weights=self.uniform.copy(), loss_weights=self.alpha.copy())
        return Plan(weights=self.alpha.copy())

    def observe(self, step: int, signals: Signals) -> None:
        cfg = self.config
        if (step + 1) % cfg.update_every:
            return
        m = self.ctx.m
        total = cfg.align_samples or self.ctx.batch_size
        counts = stratified_counts(m, total, self.updates * total)
        direction = "domains" if cfg.objective == "generic" else "target"
        res = signals.sample_alignments(counts, direction, cfg.method, False, cfg.norm_probes)
        w = group_mean(res.values, res.domains, m)
        norms = gradient_norms(res.probe_values, res.domains, m)
        measured = np.isfinite(w) & np.isfinite(norms)
        if not measured.any():
            return
        self.mean_norm = float(np.mean(norms[measured]))
        fresh = doge_scores(w, self.mean_norm, signals.learning_rate(), cfg.dw_min, cfg.dw_max)
        self.scores = np.where(measured, fresh, self.scores)
        self.alpha = doge_update(self.alpha, self.scores, cfg.mu, cfg.eps)
        self.updates += 1
        self.alpha_avg = (self.alpha_avg * (self.updates - 1) + self.alpha) / self.updates

    def report(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "alpha_avg": self.alpha_avg.tolist(),
            "score": self.scores.tolist(),
            "mean_grad_norm": self.mean_norm,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha.tolist(),
            "alpha_avg": self.alpha_avg.tolist(),
            "scores": self.scores.tolist(),
            "updates": self.updates,
            "mean_norm": self.mean_norm,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["alpha"]) != self.ctx.m:
            raise CheckpointError(f"doge state has {len(state['alpha'])} domains, this run has {self.ctx.m}.")
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.alpha_avg = np.asarray(state["alpha_avg"], dtype=np.float64)
        self.scores = np.asarray(state["scores"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.mean_norm = float(state["mean_norm"])
