"""DGA: Dynamic Gradient Alignment, online domain weights that follow the target's gradient.

Fan, Grangier, Ablin, "Dynamic Gradient Alignment for Online Data Mixing" (arXiv 2410.02498).
A small target set S specialises the run: the bilevel problem min_α L_S(θ*(α)) with
θ*(α) = argmin Σ_i α_i ℓ_i is solved online, in one run, and the trained model is the output.
The first-order expansion L_S(θ - γ Σ_i α_i g_i) ≈ L_S(θ) - γ Σ_i α_i <g_i, g_S> gives the
mirror (exponentiated-gradient) step on the simplex, where domains aligned with the target
go up. Every ``update_every`` steps (0-based step s updates when (s + 1) % update_every == 0):

    a_i  = <g_i, P g_S>             alignment of group i, from the alignment engine (one jvp
                                    or two forwards over a measurement batch; P = Adam's
                                    preconditioner or identity)
    â_i  = a_i                      normalize = "none" (default, the published step)
    z    ← z + η â ;  α̂ = softmax(z)                 the mirror-descent iterate (log space)
    α    ← β α + (1 - β) α̂                            EMA of the iterate (β = ``ema``)
    z    ← log α                                      with an EMA: the next step starts from α
    sampled weights = floor(α)                        every sampled weight >= ``floor``

The default is the published step on the raw inner products (DESIGN.md, DGA: α ←
normalise(α ⊙ exp(η a)), a_i = <g_i, g_S>): the first-order drop of the target loss along
group i's gradient. Its size shrinks as the gradients do, so the step anneals by itself near
the best mixture. η = 1 fits the demo model (``configs/demo.toml``, 500 steps, 50 updates):
there <g_S, g_S> stayed between 0.3 and 2.4 (median 1.1) and the spread max_i a_i - min_i a_i
had a median of 0.77, so one update moves the logits by about as much as the former
normalised default (η = 1 on a / <g_S, g_S>: median spread 0.56) did. (On the demo
<g_S, g_S> did not shrink, 0.6 over the first 5 updates, 1.6 over the last 5: a gradient from
8 target windows is dominated by its noise.) On another model or loss scale, scale η by
1 / <g_S, g_S> at the start of the run.

``normalize = "target"`` divides by <g_S, P g_S> (a deviation, kept as a named option): the
step is then invariant to the loss scale (c·loss scales every a_i and <g_S, P g_S> by c²), but
it never anneals: near the best mixture g_S shrinks while the g_i do not, so |â| grows. In the
quadratic world of ``tests/mixers/test_dga_world.py`` (target inside the hull of two domains,
well-measured target gradient, 10 seeds, η = 1) the spread of η·â over the last tenth of the
updates was 2.7-5.1x that of the first tenth with "target" and 0.07-0.21x with the raw
products; final target loss 0.045 ± 0.011 ("target") vs 0.0026 ± 0.0002 (raw), mean ± SE; at
the best η of each, 0.0065 ± 0.0016 (η = 0.1) vs 0.0024 ± 0.0003 (η = 0.3). ``"max_abs"``
divides by the largest |a_i| (scale-free too, and it blows noise up to a full step when every
alignment is small).

The EMA feeds back: the next mirror step starts from the smoothed weights α, not from a
separate iterate. Smoothing only the output of an iterate that keeps accumulating would delay
the weights and end where the plain iterate ends (measured on the "specialise" benchmark: it
concentrated on a few clusters all the same); fed back, each update moves α only (1 - β) of
the way, which is the stabilisation the paper uses it for (a decision: the paper's text
available here does not spell out which of the two it means).

The floor acts only on what is sampled: the mirror step and the EMA both act on the same
unfloored α (= softmax(z)), and the sampler gets floor(α). The published step (DESIGN.md)
has no floor, so with a floor the iterate is still the published one: the floor is a sampling
safeguard, as ``apply_floor`` is for the other mixers. DoReMi's reference
(sangmichaelxie/doremi, ``doremi/trainer.py``, ``update_domain_weights``) instead feeds the
smoothed weights back into the next step; we do not, so that ``floor`` never changes the
trajectory of the method, only how it is sampled.

Groups and measurement: the weights are over the domains, or, with distribution reweighting
(``basis != "none"``), over p basis distributions P_1..P_p over the domains (fine clusters),
the mixture being α_fine = Σ_j w_j P_j. Every update draws ``align_samples`` samples from the
trainer's auxiliary stream, split evenly over the groups (leftover samples rotate
between updates, so every group is measured even when the batch is smaller than the number of
groups); basis j's share is drawn multinomially from P_j (seeded by (seed, update)), so its
alignment is measured on samples from P_j. A group without a sample in a measurement keeps its
relative weight: its â is set to the α̂-weighted mean of the measured ones (a constant shift of
â leaves the softmax unchanged).

Bases (``basis``) from the cluster hierarchy of a ``mixlab cluster --coarse K1`` data dir
(``signals.cluster_parents()``), one basis per coarse cluster j, over its fine children C_j:
``"importance"``: the target's cluster histogram restricted to C_j and renormalised (uniform
over C_j when the target has no document in C_j), as in the paper; ``"uniform"``: uniform over
C_j. With ``init = "importance"`` the starting weights are the target's histogram (over domains,
or its mass per coarse cluster over bases), so with importance bases α_fine starts at exactly
the importance-sampling mixture; it is mixed with uniform by ``init_smoothing`` so that no
weight starts at 0 (the mirror step can never revive an exact 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, apply_floor, register, softmax
from mixlab.mixers.importance import resolve_histogram
from mixlab.signals.alignment import group_mean, stratified_counts

_BASIS_TAG = 0xD6A  # separates the basis-draw seeds from every other seeded stream

# ---------------------------------------------------------------------------------------------
# Pure update rules.


def normalized_alignments(a: np.ndarray, direction_sq_norm: float, mode: str) -> np.ndarray:
    """[k] â from raw alignments ``a`` [k] (NaN = group not measured, kept NaN).

    "none": a (the published step); "target": a / <g_S, P g_S> (0 everywhere when the target
    gradient is 0: no information); "max_abs": a / max|a| over measured groups (0 when all
    are 0).
    """
    a = np.asarray(a, dtype=np.float64)
    if mode == "none":
        return a.copy()
    if mode == "target":
        if not (np.isfinite(direction_sq_norm) and direction_sq_norm > 0):
            return np.where(np.isnan(a), np.nan, 0.0)
        return a / direction_sq_norm
    if mode == "max_abs":
        finite = a[np.isfinite(a)]
        top = float(np.max(np.abs(finite))) if finite.size else 0.0
        return np.where(np.isnan(a), np.nan, a / top if top > 0 else 0.0)
    raise ConfigError(f"normalize {mode!r} is not one of 'none', 'target', 'max_abs'.")


def fill_unmeasured(a_hat: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[k] ``a_hat`` with NaN/inf entries replaced by the ``weights``-weighted mean of the finite
    ones (so an unmeasured group keeps its share relative to the average); all zeros when none
    is finite."""
    a = np.asarray(a_hat, dtype=np.float64)
    ok = np.isfinite(a)
    if not ok.any():
        return np.zeros_like(a)
    w = np.asarray(weights, dtype=np.float64)[ok]
    mean = float(np.sum(w * a[ok]) / w.sum()) if w.sum() > 0 else float(np.mean(a[ok]))
    return np.where(ok, a, mean)


def dga_update(
    logits: np.ndarray,
    a_hat: np.ndarray,
    eta: float,
    ema: float,
    floor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One DGA step from the iterate α = softmax(``logits``) [k]. Returns (new logits z [k],
    new sampled weights [k]).

    z' = z + η â (â with unmeasured groups filled, see ``fill_unmeasured``), shifted so that
    max z' = 0 (softmax is shift-invariant; this keeps z bounded); α̂ = softmax(z');
    α' = β α + (1 - β) α̂, and with β > 0 the returned logits are log α', so the next step
    starts from the smoothed weights. The EMA and the mirror step act on the same unfloored α;
    the floor is applied to the returned sampled weights only (floor(α')).
    """
    z = np.asarray(logits, dtype=np.float64)
    alpha = softmax(z)
    z = z + eta * fill_unmeasured(a_hat, alpha)
    z = z - np.max(z)
    mixed = ema * alpha + (1.0 - ema) * softmax(z)
    mixed = mixed / mixed.sum()
    if ema > 0:
        z = np.log(np.maximum(mixed, np.finfo(np.float64).tiny))
        z = z - np.max(z)
    return z, apply_floor(mixed, floor)


def basis_distributions(
    parents: np.ndarray, histogram: np.ndarray | None, kind: str
) -> np.ndarray:
    """[p, k] basis distributions over k fine clusters, one per coarse cluster (p = max parent
    + 1): the ``histogram`` [k] restricted to the children of j and renormalised ("importance";
    uniform over the children when the histogram has no mass there), or uniform over the
    children ("uniform"). A coarse cluster without children raises ``ConfigError``."""
    par = np.asarray(parents, dtype=np.int64)
    p = int(par.max()) + 1
    bases = np.zeros((p, par.size))
    for j in range(p):
        children = par == j
        if not children.any():
            raise ConfigError(
                f"coarse cluster {j} has no fine cluster among the run's domains; every coarse "
                "cluster needs at least one (re-cluster, or select domains covering all)."
            )
        if kind == "importance":
            if histogram is None:
                raise ConfigError("importance bases need the target's cluster histogram.")
            mass = np.where(children, histogram, 0.0)
            bases[j] = mass / mass.sum() if mass.sum() > 0 else children / children.sum()
        elif kind == "uniform":
            bases[j] = children / children.sum()
        else:
            raise ConfigError(f"basis {kind!r} is not one of 'none', 'importance', 'uniform'.")
    return bases


def basis_counts(bases: np.ndarray, total: int, rng: np.random.Generator, offset: int = 0) -> np.ndarray:
    """[p, k] int64 samples per basis and fine cluster for a measurement of ``total`` samples:
    the total split evenly over the p bases (leftovers rotating with ``offset``), and basis j's
    share drawn multinomially from P_j."""
    sizes = stratified_counts(bases.shape[0], total, offset)
    return np.stack([rng.multinomial(int(n), b / b.sum()) for n, b in zip(sizes, bases)]).astype(np.int64)


def samples_to_groups(domains: np.ndarray, group_counts: np.ndarray) -> np.ndarray:
    """[N] group of each sample: the samples of fine cluster d, in batch order, go to the groups
    in turn, ``group_counts[0, d]`` of them to group 0, then ``group_counts[1, d]`` to group 1...
    (the batch order is already shuffled by the sampler, so this is an unbiased split).
    ``group_counts`` [p, k] must have column sums equal to each cluster's sample count."""
    d = np.asarray(domains, dtype=np.int64)
    gc = np.asarray(group_counts, dtype=np.int64)
    have = np.bincount(d, minlength=gc.shape[1])
    if not np.array_equal(have, gc.sum(axis=0)):
        raise ValueError(f"samples per cluster {have.tolist()} do not match the design {gc.sum(axis=0).tolist()}.")
    out = np.empty(d.size, dtype=np.int64)
    cum = np.cumsum(gc, axis=0)
    for c in np.unique(d):
        rows = np.flatnonzero(d == c)
        out[rows] = np.searchsorted(cum[:, c], np.arange(rows.size), side="right")
    return out


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("dga")
class DGA(Mixer):
    """Dynamic Gradient Alignment: sample more of the domains whose gradient aligns with the
    target's (needs a target set: ``target.path`` or ``target.domain``)."""

    dynamic = True
    needs = frozenset({"full_model"})  # per-sample alignments

    @dataclass
    class Config:
        update_every: int = 10
        """T_r: update the weights every this many steps (one alignment measurement each)."""
        eta: float = 1.0
        """Step size η of the exponentiated step z ← z + η â. With the default raw inner
        products its unit is 1 / (loss gradient)²: 1 suits the demo model, where <g_S, g_S> is
        about 1 (see the module docstring); with 'target' or 'max_abs', â is scale-free."""
        normalize: Literal["none", "target", "max_abs"] = "none"
        """'none' (default, as published): â = the raw inner products a_i = <g_i, P g_S>, so the
        step anneals as the gradients shrink. 'target': â = a / <g_S, P g_S>, invariant to the
        loss scale but never annealing; 'max_abs': â = a / max|a_i| (see the module docstring)."""
        ema: float = 0.0
        """β: the iterate α ← β α + (1 - β) α̂, and the next step starts from α (0 = no EMA;
        the paper's EMA helps when each domain holds few tokens or the target set is tiny)."""
        floor: float = 0.0
        """Every sampled weight (over domains, or over bases) is >= this (at most 1/k): the
        sampler gets floor(α); the iterate α itself is not floored (see the module docstring)."""
        init: Literal["uniform", "importance"] = "uniform"
        """Starting weights: uniform, or the target's cluster histogram (importance sampling)."""
        init_smoothing: float = 0.01
        """init = 'importance': start from (1 - s) · histogram + s · uniform, so no weight is 0."""
        histogram: dict[str, float] = field(default_factory=dict)
        """The target's share per domain for init/bases = 'importance'; empty = from the target
        set (``signals.target_histogram()``)."""
        basis: Literal["none", "importance", "uniform"] = "none"
        """Distribution reweighting: 'none' = weights over the domains; 'importance'/'uniform' =
        weights over one basis distribution per coarse cluster of the data dir's hierarchy."""
        method: Literal["jvp", "fd"] = "jvp"
        """Alignment engine: 'jvp' (forward-mode AD, exact) or 'fd' (finite difference, any
        attention kernel)."""
        precondition: bool = False
        """Align with P g_S, P = AdamW's 1/(sqrt(v̂)+ε): the target's Adam step direction."""
        target_windows: int = 0
        """Windows of the target's probe part whose mean-loss gradient is g_S at an update:
        0 = all of them; otherwise a seeded random subset of this many, new at every update
        (one backward over these windows is part of every update's cost)."""
        align_samples: int = 0
        """Samples per alignment measurement (0 = the global batch size), drawn from the
        auxiliary stream. With 'jvp' an update costs about as much as a training step on that
        many samples (plus one backward over the target's probe windows); with 'fd' about a
        quarter of that."""

        def __post_init__(self) -> None:
            if self.update_every < 1:
                raise ConfigError(f"update_every must be >= 1, got {self.update_every}.")
            if not (np.isfinite(self.eta) and self.eta >= 0):
                raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}.")
            if not 0.0 <= self.ema < 1.0:
                raise ConfigError(f"ema must be in [0, 1), got {self.ema}.")
            if not (np.isfinite(self.floor) and self.floor >= 0):
                raise ConfigError(f"floor must be a finite number >= 0, got {self.floor}.")
            if not 0.0 < self.init_smoothing <= 1.0:
                raise ConfigError(f"init_smoothing must be in (0, 1], got {self.init_smoothing}.")
            if self.align_samples < 0 or self.target_windows < 0:
                raise ConfigError("align_samples and target_windows must be >= 0, got "
                                  f"{self.align_samples}, {self.target_windows}.")
            choices = {"normalize": ("none", "target", "max_abs"), "init": ("uniform", "importance"),
                       "basis": ("none", "importance", "uniform"), "method": ("jvp", "fd")}
            for name, allowed in choices.items():
                if getattr(self, name) not in allowed:
                    raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {allowed}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        self.bases: np.ndarray | None = None
        """[p, m] basis distributions (distribution reweighting), None over plain domains."""
        self.updates = 0
        self.last_alignment: np.ndarray | None = None
        self._set_start(np.full(ctx.m, 1.0 / ctx.m))
        # Starting points that need the run (target histogram, cluster hierarchy) come in start().
        self.ready = config.init == "uniform" and config.basis == "none"

    def _set_start(self, weights: np.ndarray) -> None:
        k = weights.size
        if self.config.floor * k > 1 + 1e-12:
            raise ConfigError(f"floor {self.config.floor} is above 1/k = {1 / k:.4g} ({k} groups).")
        self.weights = apply_floor(weights, self.config.floor)
        """[k] sampled weights over the groups (domains or bases): floor(softmax(z))."""
        with np.errstate(divide="ignore"):
            self.logits = np.log(weights) - np.log(weights).max()
        """[k] z, the mirror-descent iterate α = softmax(z) in log space (never floored)."""

    def start(self, signals: Signals) -> None:
        cfg = self.config
        need_hist = cfg.init == "importance" or cfg.basis == "importance"
        hist = (resolve_histogram(cfg.histogram, self.ctx, signals, "mixer.options.histogram")
                if need_hist else None)
        if cfg.basis != "none":
            self.bases = basis_distributions(signals.cluster_parents(), hist, cfg.basis)
        k = self.ctx.m if self.bases is None else self.bases.shape[0]
        start = np.full(k, 1.0 / k)
        if cfg.init == "importance":
            assert hist is not None
            h = hist if self.bases is None else self._coarse_mass(hist)
            start = (1.0 - cfg.init_smoothing) * h + cfg.init_smoothing / k
        self._set_start(start)
        self.ready = True

    def _coarse_mass(self, hist: np.ndarray) -> np.ndarray:
        """[p] histogram mass of each basis's support (its coarse cluster's children)."""
        assert self.bases is not None
        return np.array([hist[b > 0].sum() if b.sum() > 0 else 0.0 for b in self.bases])

    def _check_ready(self) -> None:
        if not self.ready:
            raise ConfigError(
                "dga with init = 'importance' or a basis needs start() on a fresh run (the target "
                "histogram and cluster hierarchy are read there)."
            )

    def mixture(self) -> np.ndarray:
        """[m] the sampling distribution over domains: the weights, or Σ_j w_j P_j."""
        if self.bases is None:
            return self.weights.copy()
        mix = self.weights @ self.bases
        return mix / mix.sum()

    def plan(self, step: int) -> Plan:
        self._check_ready()
        return Plan(weights=self.mixture())

    def observe(self, step: int, signals: Signals) -> None:
        cfg = self.config
        if (step + 1) % cfg.update_every:
            return
        self._check_ready()
        total = cfg.align_samples or self.ctx.batch_size
        k = self.weights.size
        offset = self.updates * total
        if self.bases is None:
            counts = stratified_counts(k, total, offset)
            design = None
        else:
            rng = np.random.default_rng([_BASIS_TAG, self.ctx.seed, self.updates])
            design = basis_counts(self.bases, total, rng, offset)
            counts = design.sum(axis=0)
        res = signals.sample_alignments(counts, "target", cfg.method, cfg.precondition,
                                        target_windows=cfg.target_windows)
        groups = res.domains if design is None else samples_to_groups(res.domains, design)
        a_hat = normalized_alignments(group_mean(res.values, groups, k), res.direction_sq_norm,
                                      cfg.normalize)
        self.logits, self.weights = dga_update(self.logits, a_hat, cfg.eta, cfg.ema, cfg.floor)
        self.last_alignment = a_hat
        self.updates += 1

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"updates": self.updates}
        if self.last_alignment is not None:
            out["alignment"] = [float(x) if np.isfinite(x) else None for x in self.last_alignment]
        if self.bases is not None:
            out["basis_weights"] = self.weights.tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "logits": self.logits.tolist(),
            "updates": self.updates,
            "ready": self.ready,
            "bases": None if self.bases is None else self.bases.tolist(),
            "last_alignment": None if self.last_alignment is None else self.last_alignment.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bases = state["bases"]
        k = self.ctx.m if bases is None else len(bases)
        if len(state["weights"]) != k or (bases is not None and len(bases[0]) != self.ctx.m):
            raise CheckpointError(f"dga state does not fit this run's {self.ctx.m} domains.")
        self.bases = None if bases is None else np.asarray(bases, dtype=np.float64)
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.logits = np.asarray(state["logits"], dtype=np.float64)
        self.updates = int(state["updates"])
        self.ready = bool(state["ready"])
        last = state["last_alignment"]
        self.last_alignment = None if last is None else np.asarray(last, dtype=np.float64)
