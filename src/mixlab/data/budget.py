"""Repetition budgets: train on at most ``max_epochs`` passes over each domain's windows.

Users have finite data, and every published online mixer will happily read a small domain or
cluster dozens of times. ``data.max_epochs`` gives each domain d a budget of
``B_d = floor(max_epochs_d * n_windows_d)`` training windows (``n_windows_d`` as counted by
``MixtureSampler.n_windows``); a domain without a budget has ``B_d = inf``. Before every step
the trainer projects the mixer's plan onto the plans that keep every domain within what is
left of its budget, ``r_d = B_d - drawn_d`` (``drawn`` = ``MixtureSampler.windows_drawn``).
The budget has no state of its own: ``r`` is a function of the sampler's drawn counts, which
the checkpoint holds, so a resumed run projects exactly as an uninterrupted one.

The projection (``apply_budget``), for a global batch of b samples:

- The cap on a domain's share is ``c_d = r_d / b`` (expected draws this step at most what is
  left: ``pace = "greedy"``, the default) or ``c_d = r_d / (b * steps_left)`` (``pace =
  "even"``: at most the share that, held for the rest of the run, spends the budget by the
  last step, so a domain's repetitions are spread over the run instead of spent first).
- Weights w are replaced by the KL (I-) projection onto the capped simplex
  ``{q : q >= 0, sum q = 1, q <= c}``, which is ``q_d = min(c_d, lam * w_d)`` with ``lam >= 1``
  set so that ``sum q = 1``: capped domains give their excess to the others in proportion to
  the mixer's own weights (``project_capped``). Weights that no cap binds are returned as
  they are, so a budget that never binds changes nothing, bit for bit.
- The sampler draws a weights plan i.i.d., so a domain with ``0 < r_d < b`` and weight > 0
  could be drawn past its budget by chance. Such a step becomes an exact composition: the
  counts closest to ``b * q`` with no domain above ``r_d`` (``capped_counts``). No domain is
  ever drawn past its budget: a hard invariant, not an expectation.
- A plan with exact ``counts`` (Aioli's probes) is capped at ``r_d`` and the freed samples go
  to the domains with budget left, in proportion to the plan's counts (the same projection
  with the greedy caps, then ``capped_counts``). The even pace does not apply to counts: a
  probe is a deliberate short composition; the pace of the later steps adapts to what it used.
- With ``loss_weights`` (DoReMi, DoGE, ``mixer.apply = "loss"``), the loss weight of a domain
  the projected plan no longer samples is given to the sampled ones in proportion to theirs
  (it cannot be trained); the factors ``w_d / q_d`` use the projected q.
- If a domain's mass cannot go anywhere (every domain the mixer weights is capped), the rest
  goes to the domains it gave weight 0, uniformly up to their caps: the limit of the KL
  projection of ``(1 - eps) w + eps * uniform`` as eps -> 0.

Exhaustion: every step draws exactly b windows, so every step can be filled within the budget
iff ``sum_d B_d >= steps * b`` (true whenever some domain has no budget).
``RepetitionBudget.from_config`` checks this before the run starts and refuses, saying how
many steps the budget allows, rather than stop mid-run or break the budget.

What a mixer sees. The budget sits between ``mixer.plan`` and the sampler
(``Trainer._resolve_plan``) and never writes to the mixer: its state evolves from its own
plans. Its signals (``train_counts``, ``train_losses``, excess losses, ...) are those of the
batch actually drawn, so a spent domain shows up as any domain absent from a batch (count 0,
NaN loss). The ``weights`` (and ``loss_weights``) in metrics.jsonl and summary.json's
``weights_avg`` are the budgeted plan, what was trained; ``weights_final`` is the mixer's own
plan after the last step (what the method learned). Two mixers use their own planned
probabilities where the budget may have changed them: ODM's importance-weighted rewards divide
by its own p, and Aioli's probe compositions R are the planned ``probe_counts``. Batches drawn
to *measure* (the auxiliary stream of DGA/DoGE alignments, Skill-It's branch copies, DWM's
validation batches) train no weight of the run's model and are not counted against the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixlab.errors import ConfigError
from mixlab.mixers.base import Plan

PACES = ("greedy", "even")
"""How the budget is spent over the run (see the module docstring)."""

_SUM_ATOL = 1e-6
"""How far from 1 the sum of the weights given to ``project_capped`` may be (the sampler's
``WEIGHTS_ATOL``)."""


def budget_windows(
    max_epochs: float | Mapping[str, float] | None,
    domains: Sequence[str],
    n_windows: np.ndarray | Sequence[int],
) -> np.ndarray:
    """[m] float64 training windows each domain may be drawn: ``floor(e_d * n_windows_d)``.

    ``max_epochs``: None, a number for every domain, or a mapping domain -> number; a domain
    missing from the mapping, or with 0, has no budget (``inf``). ``n_windows`` [m] are the
    windows of each domain's train split, in the order of ``domains``. The product is rounded
    to 1e-9 before the floor, so that float noise (0.29 * 100 = 28.999...) cannot take a
    window away. Raises ``ConfigError`` for a negative or non-finite value, or a domain name
    that is not one of ``domains``.
    """
    n = np.asarray(n_windows, dtype=np.int64)
    if n.shape != (len(domains),):
        raise ConfigError(f"n_windows has shape {n.shape}; expected ({len(domains)},).")
    if max_epochs is None:
        per = dict.fromkeys(domains, 0.0)
    elif isinstance(max_epochs, Mapping):
        unknown = [d for d in max_epochs if d not in domains]
        if unknown:
            raise ConfigError(
                f"data.max_epochs names domain {', '.join(repr(d) for d in unknown)}, which this "
                f"run does not train on ({', '.join(domains)})."
            )
        per = {d: max_epochs.get(d, 0.0) for d in domains}
    else:
        per = dict.fromkeys(domains, max_epochs)
    out = np.full(len(domains), np.inf)
    for i, d in enumerate(domains):
        e = per[d]
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ConfigError(
                f"data.max_epochs for domain '{d}' must be a finite number >= 0 (0 = no budget), "
                f"got {e!r}."
            )
        if e > 0:
            out[i] = math.floor(round(float(e) * int(n[i]), 9))
    return out


def _fill(prior: np.ndarray, caps: np.ndarray, mass: float) -> tuple[np.ndarray, bool]:
    """Water-filling: ``q_d = min(caps_d, lam * prior_d)`` [m] with ``sum q = mass``.

    ``prior`` [m] >= 0, ``caps`` [m] in [0, inf]. Returns ``(q, absorbed)``; when the support
    of ``prior`` cannot hold ``mass`` (every domain of it capped), ``q`` is ``caps`` on the
    support, sums to less than ``mass``, and ``absorbed`` is False.

    The rising-lam loop: with lam fitted to the uncapped domains, every domain with
    ``lam * prior_d > caps_d`` is capped in the solution too (capping lowers the sum, so the
    final lam is larger), so each pass caps at least one more domain or stops: at most m passes.
    """
    q = np.zeros_like(prior)
    capped = np.zeros(prior.size, dtype=bool)
    while True:
        free = (prior > 0) & ~capped
        if not free.any():
            q[capped] = caps[capped]
            return q, False
        lam = (mass - float(caps[capped].sum())) / float(prior[free].sum())
        over = free & (lam * prior > caps)
        if not over.any():
            q[capped] = caps[capped]
            q[free] = lam * prior[free]
            return q, True
        capped |= over


def project_capped(
    weights: np.ndarray | Sequence[float], caps: np.ndarray | Sequence[float]
) -> np.ndarray:
    """The KL projection [m] of the distribution ``weights`` [m] onto ``{q >= 0, sum q = 1,
    q <= caps}``: ``argmin_q KL(q || weights)``.

    ``caps`` [m] >= 0, ``inf`` for no cap. The solution is ``q_d = min(caps_d, lam * w_d)``
    with ``lam >= 1`` (the excess of the capped domains goes to the others in proportion to
    their weights). When the domains with weight > 0 cannot hold the whole mass, they are set
    to their caps and the rest goes to the zero-weight domains, uniformly up to their caps (the
    limit of projecting ``(1 - eps) w + eps / m`` as eps -> 0). ``weights`` that satisfy every
    cap are returned unchanged (a copy). Raises ``ConfigError`` when ``sum min(caps, 1) < 1``
    (no distribution satisfies the caps) or for invalid input.
    """
    w = np.asarray(weights, dtype=np.float64)
    c = np.asarray(caps, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or c.shape != w.shape:
        raise ConfigError(f"weights {w.shape} and caps {c.shape} must be the same [m] vector.")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(float(w.sum()) - 1.0) > _SUM_ATOL:
        raise ConfigError(f"weights must be a distribution, got {w.tolist()}.")
    if np.any(np.isnan(c)) or np.any(c < 0):
        raise ConfigError(f"caps must be >= 0 (inf for none), got {c.tolist()}.")
    c = np.minimum(c, 1.0)
    if np.all(w <= c):
        return w.copy()
    if float(c.sum()) < 1.0 - 1e-12:
        raise ConfigError(
            f"no mixture satisfies the caps {c.tolist()}: they sum to {float(c.sum()):.6g} < 1."
        )
    q, absorbed = _fill(w, c, 1.0)
    if not absorbed:
        rest = 1.0 - float(q.sum())
        extra, _ = _fill((w == 0).astype(np.float64), c, rest)
        q = q + extra
    return q


def capped_counts(
    target: np.ndarray | Sequence[float], caps: np.ndarray | Sequence[float], batch: int
) -> np.ndarray:
    """[m] int64 counts summing to ``batch``, each at most ``caps_d``, closest to ``target``.

    ``target`` [m] >= 0 sums to ``batch`` (``batch * q``); ``caps`` [m] are whole numbers or
    ``inf``. Largest-remainder rounding as in ``mixlab.data.sampler.closest_counts`` (floors
    first, then one more sample each to the largest fractional parts, ties to the lower
    index), skipping domains at their cap; when ``target <= caps`` (the projection's output)
    every count is the floor or the ceiling of its target. Products are rounded to 1e-9 first
    so that float noise does not decide a tie or lift a floor. Raises ``ConfigError`` when the
    caps sum to less than ``batch``.
    """
    t = np.round(np.asarray(target, dtype=np.float64), 9)
    c = np.asarray(caps, dtype=np.float64)
    if float(np.minimum(c, batch).sum()) < batch:
        raise ConfigError(f"caps {c.tolist()} hold fewer than the {batch} samples of a batch.")
    base = np.minimum(np.floor(t), c).astype(np.int64)
    left = batch - int(base.sum())
    if left < 0:
        raise ConfigError(f"target {t.tolist()} sums to more than the batch {batch}.")
    spare = base < c
    frac = t - base
    # lexsort: last key is primary -> descending fraction, then ascending index.
    order = [int(i) for i in np.lexsort((np.arange(t.size), -frac)) if spare[i]]
    for i in order[:left]:
        base[i] += 1
    left -= min(left, len(order))
    # Only when target broke a cap (not the projection's output): fill in index order.
    for i in range(t.size):
        if left == 0:
            break
        room = int(min(c[i], batch) - base[i])
        take = min(room, left)
        base[i] += take
        left -= take
    return base


def _loss_weights_on(loss_weights: np.ndarray | None, q: np.ndarray) -> np.ndarray | None:
    """``loss_weights`` [m] with the weight of domains not sampled (``q_d = 0``) given to the
    sampled ones in proportion to theirs; ``q`` itself when none of them has loss weight."""
    if loss_weights is None:
        return None
    lw = np.asarray(loss_weights, dtype=np.float64)
    sampled = q > 0
    if np.all(lw[~sampled] == 0):
        return lw
    kept = np.where(sampled, lw, 0.0)
    total = float(kept.sum())
    return kept / total if total > 0 else q.copy()


def apply_budget(
    plan: Plan, remaining: np.ndarray, batch: int, steps_left: int, pace: str = "greedy"
) -> Plan:
    """The plan to train instead of ``plan`` so that no domain exceeds what is left of its
    budget (the projection of the module docstring).

    ``plan``: a resolved plan (``mixlab.mixers.base.resolve_plan``); ``remaining`` [m] float64
    windows left per domain (``inf`` = no budget); ``batch``: the global batch size;
    ``steps_left``: steps still to train, this one included (used by ``pace = "even"``).
    Returns ``plan`` itself when no cap binds; otherwise a plan with the projected ``weights``
    (or, when a domain with weight > 0 has fewer than ``batch`` windows left, exact
    ``counts`` with ``weights = counts / batch``), the same ``phase`` and the loss weights of
    ``_loss_weights_on``. Raises ``ConfigError`` when fewer than ``batch`` windows are left in
    all (``RepetitionBudget.from_config`` rules that out before the run).
    """
    if pace not in PACES:
        raise ConfigError(f"budget pace must be one of {', '.join(PACES)}, got {pace!r}.")
    r = np.asarray(remaining, dtype=np.float64)
    if float(np.minimum(r, batch).sum()) < batch:
        raise ConfigError(
            f"the repetition budget is spent: {int(r.sum())} windows are left in all, and a step "
            f"needs {batch}. Raise data.max_epochs or lower train.steps."
        )
    hard = r / batch

    def exact(q: np.ndarray) -> Plan:
        n = capped_counts(batch * q, r, batch)
        w = n / batch
        return Plan(weights=w, counts=n, loss_weights=_loss_weights_on(plan.loss_weights, w),
                    phase=plan.phase)

    if plan.counts is not None:
        counts = np.asarray(plan.counts, dtype=np.int64)
        if np.all(counts <= r):
            return plan
        return exact(project_capped(counts / batch, hard))
    caps = hard
    if pace == "even":
        caps = r / (batch * max(int(steps_left), 1))
        # sum(r) >= batch * steps_left holds through a run that passed from_config (every step
        # draws exactly batch windows); a caller past that point still gets a feasible step.
        if float(np.minimum(caps, 1.0).sum()) < 1.0:
            caps = hard
    w = np.asarray(plan.weights, dtype=np.float64)

    def could_overdraw(q: np.ndarray) -> bool:
        return bool(np.any((q > 0) & (r < batch)))

    if np.all(w <= caps) and not could_overdraw(w):
        return plan
    q = project_capped(w, caps)
    if could_overdraw(q):
        return exact(q)
    return Plan(weights=q, loss_weights=_loss_weights_on(plan.loss_weights, q), phase=plan.phase)


@dataclass(frozen=True)
class RepetitionBudget:
    """A run's repetition budget: ``apply`` projects each step's plan (see the module doc)."""

    limit: np.ndarray
    """[m] float64 training windows each domain may be drawn (``inf`` = no budget)."""
    batch: int
    """Global batch size in samples."""
    total_steps: int
    """Steps of the whole run."""
    pace: str = "greedy"
    """'greedy' or 'even' (see the module docstring)."""

    @classmethod
    def from_config(
        cls,
        max_epochs: float | Mapping[str, float] | None,
        pace: str | None,
        domains: Sequence[str],
        n_windows: np.ndarray | Sequence[int],
        total_steps: int,
        batch: int,
    ) -> RepetitionBudget | None:
        """The budget of ``data.max_epochs`` / ``data.budget_pace`` (None when no domain has
        one). Raises ``ConfigError`` when the budget cannot fill ``total_steps`` batches of
        ``batch`` windows, saying how many steps it allows."""
        pace = pace or "greedy"
        if pace not in PACES:
            raise ConfigError(f"data.budget_pace must be one of {', '.join(PACES)}, got {pace!r}.")
        limit = budget_windows(max_epochs, domains, n_windows)
        if np.all(np.isinf(limit)):
            return None
        need = total_steps * batch
        total = float(limit.sum())
        if total < need:
            per = ", ".join(f"{d} {int(x)}" for d, x in zip(domains, limit))
            raise ConfigError(
                f"data.max_epochs allows {int(total)} training windows in all ({per}), but "
                f"train.steps x train.batch_size = {total_steps} x {batch} = {need} are needed: "
                f"the budget lasts {int(total // batch)} steps. Lower train.steps, raise "
                "data.max_epochs, or leave some domain without a budget (0 in the table)."
            )
        return cls(limit=limit, batch=batch, total_steps=total_steps, pace=pace)

    def remaining(self, drawn: np.ndarray | Sequence[int]) -> np.ndarray:
        """[m] float64 windows left per domain given ``drawn`` [m] windows drawn so far."""
        return np.maximum(self.limit - np.asarray(drawn, dtype=np.float64), 0.0)

    def apply(self, plan: Plan, drawn: np.ndarray | Sequence[int], step: int) -> Plan:
        """``apply_budget`` for sampler step ``step`` with ``drawn`` [m] windows drawn so far."""
        return apply_budget(
            plan, self.remaining(drawn), self.batch, self.total_steps - step, self.pace
        )
