"""DoGE: domain reweighting with generalisation estimation.

Fan, Pagliardini, Jaggi, "DoGE: Domain Reweighting with Generalization Estimation" (ICML 2024,
arXiv 2310.15393); reference code Olivia-fsm/DoGE at 88400e9 (``src/trainer.py``,
``update_domain_weights_distributed``, lines 719-770, the path of the published
``config/doge.json``). A proxy model trains on Σ_i α_i ℓ_i while α follows how much a step on
each domain reduces the objective. Every ``update_every`` steps (0-based step s updates when
(s + 1) % update_every == 0), with learning rate lr_t of the step:

    ĝ_i = clip(∇ mean-loss of domain i, C)     each domain's gradient clipped to norm C
                                                (``torch.nn.utils.clip_grad_norm_``, lines
                                                733-734; C = the trainer's max_grad_norm)
    W_i = Σ_{j≠i} <ĝ_i, ĝ_j>   "generic"       (line 754: scores_mat.sum(-1) - diag)
    W_i = <ĝ_i, ĝ_target>      "target"        (line 756; the target gradient clipped too)
    s_i = clip(lr_t · W_i / (mean_i ||ĝ_i|| + 1e-6), lr_t · dw_min, lr_t · dw_max)
    log α ← log α + s / μ ;  α ← softmax(log α) ;  α ← (1 - ε) α + ε / m
    ᾱ ← running mean of α over updates     (the proxy's output, returned by plan(total_steps))

The proxy's update Σ_i α_i g_i is loss re-weighting: with ``apply = "loss"`` (published) the
batch is drawn uniformly and a sample of domain i has its loss multiplied by α_i / q_i
(``Plan.loss_weights``); ``apply = "sample"`` draws domains by α instead. Defaults follow the
paper/DESIGN.md: μ = 0.01 (the code's default is 0.05), dw_min = 0, dw_max = 5, ε = 0, and
C = ``grad_clip`` = 5 (``max_grad_norm`` of ``config/doge.json``). Differences from the
reference that remain: the gradients are taken on a fresh auxiliary batch with equal counts per
domain (the reference uses the training batch, drawn uniformly), the proxy step uses the
trainer's loss re-weighting with the α of the previous update and the trainer's global clip
(the reference steps on Σ α_i ĝ_i of the clipped gradients with the new α), and a domain
without a sample keeps its previous score (the reference keeps its stale gradient row).

Two estimators (``estimator``):
- ``"gradients"`` (published, default): one backward per domain on one auxiliary batch
  (``signals.domain_gradient_gram``: the Gram matrix of the per-domain gradients, plus the
  target's); the clip and the sums above are exact. Memory: one gradient buffer per domain.
- ``"alignments"`` (mixlab's engine, the rule before issue 13): no per-domain backward, no
  buffers. W_i is the mean over domain i's samples of the per-sample alignment ``<∇ℓ_x, v>`` on
  a measurement batch (one jvp, or two forwards); for "generic", v = Σ_j g'_j is one backward
  over a *second*, independent batch, so W_i estimates Σ_j <g_i, g_j> over *all* j (the j = i
  cross term <ĝ_i, ĝ'_i> of independent batches has no noise bias; it cannot be separated
  without one backward per domain, so it is kept), and nothing is clipped (there is no
  per-domain gradient to clip). mean_i ||g_i|| comes from R = ``norm_probes`` seeded Gaussian
  directions z_r on the same batch: <ĝ_i, z_r> ~ N(0, ||ĝ_i||²), so ||ĝ_i|| ≈
  sqrt(mean_r <ĝ_i, z_r>²) / c_R with c_R = E[sqrt(χ²_R / R)] (unbiased per domain).

What it does with an unlearnable domain: DoGE reads gradients, not losses, so a high loss by
itself earns nothing. A domain whose gradient is orthogonal to (or against) the others' or the
target's scores 0 (the lower clip) while aligned domains score > 0, and its weight falls (the
quadratic-world test). A shuffled-token copy of a domain is not such a domain: its gradient
still pushes up the tokens of the domain it copies, and in a tiny 80-step run it kept 0.43 of
the mass (the copied domain 0.45).
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


def clip_factors(norms: np.ndarray, max_norm: float) -> np.ndarray:
    """[k] the factor ``torch.nn.utils.clip_grad_norm_`` multiplies a gradient of norm ``norms``
    by: min(1, max_norm / (norm + 1e-6)); 1 everywhere when max_norm <= 0 (no clip)."""
    n = np.asarray(norms, dtype=np.float64)
    if max_norm <= 0:
        return np.ones_like(n)
    return np.minimum(1.0, max_norm / (n + 1e-6))


def gram_alignments(
    gram: np.ndarray, max_norm: float, objective: str
) -> tuple[np.ndarray, np.ndarray]:
    """DoGE's W [m] and the clipped norms ||ĝ_i|| [m] from the Gram matrix ``gram`` [k, k] of
    the unclipped per-domain gradients (k = m, or m + 1 with the target last for "target").

    Clipping scales gradient a by c_a (``clip_factors``), so <ĝ_a, ĝ_b> = c_a c_b G_ab. "generic":
    W_i = Σ_{j≠i} <ĝ_i, ĝ_j> over the measured domains j (reference ``src/trainer.py:754``);
    "target": W_i = <ĝ_i, ĝ_target> (line 756). NaN for a domain without gradient (NaN
    diagonal)."""
    g = np.asarray(gram, dtype=np.float64)
    k = g.shape[0]
    m = k - 1 if objective == "target" else k
    diag = np.diag(g)
    measured = np.isfinite(diag)
    norms = np.sqrt(np.where(measured, np.maximum(diag, 0.0), np.nan))
    c = clip_factors(norms, max_norm)
    gc = np.where(np.outer(measured, measured), g * np.outer(c, c), 0.0)
    if objective == "target":
        w = gc[:m, m] if measured[m] else np.full(m, np.nan)
    else:
        w = gc.sum(axis=1) - np.diag(gc)
    w = np.where(measured[:m], w, np.nan)
    return w, (c * norms)[:m]


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
    needs = frozenset({"full_model"})  # per-domain gradients / alignments

    @dataclass
    class Config:
        estimator: Literal["gradients", "alignments"] = "gradients"
        """'gradients': per-domain gradients, clipped, Σ_{j≠i} (published); 'alignments':
        mixlab's engine (no per-domain backward, keeps j = i, no clip). See the module doc."""
        grad_clip: float = 5.0
        """C: each domain's gradient is clipped to this norm before the inner products
        (reference: the trainer's max_grad_norm, 5.0 in config/doge.json); 0 = no clip.
        'gradients' only."""
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
        """'alignments': the engine's method, 'jvp' (exact) or 'fd' (finite difference)."""
        align_samples: int = 0
        """Samples per measurement (0 = the global batch size), split evenly over the domains;
        with 'alignments' the 'generic' direction draws the same number again for v."""
        norm_probes: int = 4
        """'alignments': Gaussian directions used to estimate mean_i ||g_i|| (each costs one more
        jvp)."""

        def __post_init__(self) -> None:
            if not (np.isfinite(self.mu) and self.mu > 0):
                raise ConfigError(f"mu must be a finite number > 0, got {self.mu}.")
            if not (np.isfinite(self.dw_min) and np.isfinite(self.dw_max) and self.dw_min <= self.dw_max):
                raise ConfigError(f"need finite dw_min <= dw_max, got {self.dw_min}, {self.dw_max}.")
            if not 0.0 <= self.eps <= 1.0:
                raise ConfigError(f"eps must be in [0, 1], got {self.eps}.")
            if not (np.isfinite(self.grad_clip) and self.grad_clip >= 0):
                raise ConfigError(f"grad_clip must be a finite number >= 0, got {self.grad_clip}.")
            if self.update_every < 1 or self.norm_probes < 1 or self.align_samples < 0:
                raise ConfigError("update_every and norm_probes must be >= 1, align_samples >= 0.")
            choices = {"objective": ("generic", "target"), "apply": ("loss", "sample"),
                       "method": ("jvp", "fd"), "estimator": ("gradients", "alignments")}
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
        if cfg.estimator == "gradients":
            gram = signals.domain_gradient_gram(counts, target=cfg.objective == "target")
            w, norms = gram_alignments(gram, cfg.grad_clip, cfg.objective)
        else:
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
