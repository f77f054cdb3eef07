"""Lazily computed signals handed to a mixer after each step (see ``mixers.base.Signals``).

Besides the loss signals, this module holds the session side of the alignment engine
(``measure_alignments``): it draws measurement batches with exact per-domain counts from the
session's auxiliary data stream (never the training stream), builds the direction (target,
validation or domain gradient), optionally preconditions it with AdamW's second moment, and
runs ``mixlab.signals.alignment`` on the bare model. Under ``torchrun`` every rank measures its
slice of each measurement batch and the values are gathered in rank order, so every rank
returns the same arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from mixlab.errors import ConfigError
from mixlab.mixers.doremi import clipped_token_excess
from mixlab.model import token_losses
from mixlab.signals.alignment import (
    METHODS,
    Direction,
    SampleAlignments,
    dot,
    gaussian_direction,
    group_mean,
    loss_gradient,
    per_sample_alignments,
    precondition,
    stratified_counts,
)
from mixlab.train.distributed import all_gather_array

if TYPE_CHECKING:
    from mixlab.data.format import DataDir
    from mixlab.data.sampler import MixtureSampler
    from mixlab.train.config import TrainConfig
    from mixlab.train.distributed import DistInfo
    from mixlab.train.evaluate import EvalSet
    from mixlab.train.target import TargetSet

class Session(Protocol):
    """What the signals read of a run: ``mixlab.train.session.MixingSession`` provides it."""

    cfg: TrainConfig
    data: DataDir
    domains: list[str]
    m: int
    dist: DistInfo
    aux_sampler: MixtureSampler
    signal_set: EvalSet
    target: TargetSet | None
    reference: torch.nn.Module | None
    rank: int
    world: int

    @property
    def provides(self) -> frozenset[str]: ...
    @property
    def model(self) -> torch.nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer | None: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]: ...
    def learning_rate(self, step: int) -> float: ...
    def signal_eval_losses(self, step: int) -> np.ndarray: ...
    def target_probe_loss(self, step: int) -> float: ...
    def reference_sample_losses(self, tokens: torch.Tensor) -> np.ndarray: ...
    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int, step: int,
                           lr: float | None = None, counts: np.ndarray | None = None,
                           stream: int = 0) -> np.ndarray: ...


DIRECTIONS = ("target", "val", "domains")
"""Directions ``measure_alignments`` can build: the mean-loss gradient of the target's probe
windows; of the mixer-eval validation windows (mean over domains of each domain's mean); and
the sum over domains of each domain's mean-loss gradient on a fresh auxiliary batch (DoGE)."""

# Tags that separate these seeded streams from every other one.
_PROBE_TAG = 0x9E3779B9  # Gaussian probe directions
_TARGET_TAG = 0x7A12  # target window subsets


def per_domain_mean(values: np.ndarray, domains: np.ndarray, m: int) -> np.ndarray:
    """[m] mean of ``values`` [b] per domain index ``domains`` [b]; NaN where a domain is absent."""
    sums = np.bincount(domains, weights=values, minlength=m)
    counts = np.bincount(domains, minlength=m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@torch.no_grad()
def model_token_losses(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Per-token losses [n, T] (float32, CPU) of ``model`` on ``tokens`` [n, T+1], in eval mode
    (no dropout, no RNG drawn; the mode is restored), one forward as the session's reference
    pass (``Session.reference_sample_losses``)."""
    was_training = model.training
    model.eval()
    try:
        x = tokens.to(device)
        with autocast():
            logits = model(x[:, :-1])
        return token_losses(logits, x[:, 1:]).cpu()
    finally:
        model.train(was_training)


class StepSignals:
    """Signals of one finished step. Every expensive value is computed on first use only.

    ``token_losses`` [b_local, T], when the session gives it, holds the per-token losses of this
    rank's rows of the batch from the training forward (before the optimizer step); without it
    ``excess_losses`` runs the model once more on the batch, after the step.
    """

    def __init__(
        self,
        step: int,
        session: Session,
        sample_losses: np.ndarray | None,
        domains: np.ndarray | None,
        batch_tokens: torch.Tensor | None,
        token_losses: torch.Tensor | None = None,
        lr: float | None = None,
    ):
        self.step = step
        self._lr = lr
        self._session = session
        self._losses = sample_losses
        self._domains = domains
        self._tokens = batch_tokens
        self._token_losses = token_losses
        self._cache: dict[str, object] = {}

    def _cached(self, key: str, fn: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def train_losses(self) -> np.ndarray:
        m = self._session.m
        if self._losses is None:
            return np.full(m, np.nan)
        return per_domain_mean(self._losses, self._domains, m)

    def train_counts(self) -> np.ndarray:
        m = self._session.m
        if self._domains is None:
            return np.zeros(m, dtype=np.int64)
        return np.bincount(self._domains, minlength=m)

    def eval_losses(self) -> np.ndarray:
        return self._session.signal_eval_losses(self.step)

    def target_loss(self) -> float:
        return self._session.target_probe_loss(self.step)

    def reference_losses(self) -> np.ndarray:
        def compute() -> np.ndarray:
            if self._tokens is None:
                return np.full(self._session.m, np.nan)
            ref = self._session.reference_sample_losses(self._tokens)
            return per_domain_mean(ref, self._domains, self._session.m)

        return self._cached("reference", compute)  # type: ignore[return-value]

    def excess_losses(self) -> np.ndarray:
        """[m] DoReMi's per-domain excess loss of this step's batch: the mean over the domain's
        tokens of max(ℓ_proxy - ℓ_ref, 0), clipped per token (sangmichaelxie/doremi
        ``doremi/session.py:252``); NaN for a domain with no sample.

        ℓ_proxy comes from the training forward when the session passed ``token_losses`` (the
        reference's order: the excess of the batch the proxy is trained on, before its step);
        otherwise from one more forward of the model after the optimizer step, which reads each
        loss one step late (slightly lower on the batch just trained on).
        """

        def compute() -> np.ndarray:
            tr = self._session
            if self._tokens is None or self._domains is None:
                return np.full(tr.m, np.nan)
            if tr.reference is None:
                raise ConfigError(
                    f"mixer '{tr.cfg.mixer.name}' needs a reference model: set mixer.reference "
                    "to a finished run dir (e.g. a stratified run)."
                )
            ref = model_token_losses(tr.reference, self._tokens, tr.device, tr.autocast)
            proxy = self._token_losses
            if proxy is None:
                proxy = model_token_losses(tr.model, self._tokens, tr.device, tr.autocast)
            local = clipped_token_excess(proxy.float().cpu().numpy(), ref.numpy())
            return per_domain_mean(all_gather_array(local, tr.dist), self._domains, tr.m)

        return self._cached("excess", compute)  # type: ignore[return-value]

    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int,
                           counts: np.ndarray | None = None, stream: int = 0) -> np.ndarray:
        mixtures = np.atleast_2d(np.asarray(mixtures, dtype=np.float64))
        if mixtures.shape[1] != self._session.m:
            raise ConfigError(f"branch mixtures must have {self._session.m} columns.")
        if counts is not None:
            counts = np.atleast_2d(np.asarray(counts, dtype=np.int64))
        # The lr of the step observed: a driver whose scheduler already moved on (the HF
        # Trainer's) trains the branches as the step itself was trained.
        return self._session.branch_eval_deltas(mixtures, steps, self.step, self.learning_rate(),
                                                counts=counts, stream=stream)

    # ------------------------------------------------------------ alignment signals

    def sample_alignments(
        self,
        counts: np.ndarray,
        direction: str = "target",
        method: str = "jvp",
        precondition: bool = False,
        probes: int = 0,
        target_windows: int = 0,
    ) -> SampleAlignments:
        return measure_alignments(
            self._session, self.step, counts, direction, method, precondition, probes, self._cache,
            target_windows,
        )

    def domain_gradient_gram(
        self, counts: np.ndarray, target: bool = False, target_windows: int = 0
    ) -> np.ndarray:
        return domain_gradient_gram(self._session, self.step, counts, target, target_windows,
                                    self._cache)

    def alignment(
        self,
        direction: str = "target",
        counts: np.ndarray | None = None,
        method: str = "jvp",
        precondition: bool = False,
    ) -> np.ndarray:
        m = self._session.m
        if counts is None:
            counts = stratified_counts(m, self._session.cfg.train.batch_size)
        res = self.sample_alignments(counts, direction, method, precondition)
        return group_mean(res.values, res.domains, m)

    def learning_rate(self) -> float:
        # The lr the driver used for this step, else the schedule's (start() asks at step -1).
        if self._lr is not None and np.isfinite(self._lr):
            return float(self._lr)
        return self._session.learning_rate(max(self.step, 0))

    def target_histogram(self) -> np.ndarray:
        return target_histogram(self._session)

    def cluster_parents(self) -> np.ndarray:
        return cluster_parents(self._session)


# ---------------------------------------------------------------------------------------------
# The session side of the alignment engine.


def measurement_batches(counts: np.ndarray, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Plan the auxiliary batches for a measurement of ``counts`` [m] samples per domain (any
    positive total): a list of (draw [m], keep [m]) per batch, where ``draw`` sums to ``batch``
    (the sampler's global batch) and ``keep <= draw`` are the samples measured. The samples are
    filled domain by domain in index order; the last batch is padded to ``batch`` with samples
    spread evenly over the domains, which are read but never measured. The ``keep`` sum to
    ``counts``."""
    c = np.asarray(counts, dtype=np.int64)
    total = int(c.sum())
    if total <= 0:
        raise ConfigError(f"alignment counts sum to {total}; ask for at least one sample.")
    n = -(-total // batch)
    flat = np.repeat(np.arange(c.size, dtype=np.int64), c)
    out = []
    for k in range(n):
        keep = np.bincount(flat[k * batch:(k + 1) * batch], minlength=c.size).astype(np.int64)
        draw = keep + stratified_counts(c.size, batch - int(keep.sum()))
        out.append((draw, keep))
    return out


def keep_mask(domains: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[B] bool: True for the first ``keep[d]`` samples of each domain d in ``domains`` [B]
    (batch order, which the sampler has already shuffled), the samples a measurement uses."""
    d = np.asarray(domains, dtype=np.int64)
    rank = np.empty(d.size, dtype=np.int64)
    for c in np.unique(d):
        rows = np.flatnonzero(d == c)
        rank[rows] = np.arange(rows.size)
    return rank < np.asarray(keep)[d]


def _check_counts(session: Session, counts: np.ndarray) -> np.ndarray:
    try:
        c = np.asarray(counts)
        f = c.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"alignment counts must be a vector of integers, got {counts!r}.") from None
    if c.shape != (session.m,) or not np.all(np.isfinite(f)) or np.any(f != np.round(f)) or np.any(f < 0):
        raise ConfigError(
            f"alignment counts must be {session.m} non-negative integers (one per domain), got "
            f"{c.tolist()}."
        )
    return f.astype(np.int64)


def _all_reduce_direction(session: Session, d: Direction) -> Direction:
    """Sum a direction over ranks (each rank computed its share of the windows)."""
    info = session.dist
    if info.enabled:
        import torch.distributed as dist

        for t in d.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return d


def _window_gradient(session: Session, windows: torch.Tensor, weights: torch.Tensor) -> Direction:
    """∇ Σ_x w_x ℓ_x over ``windows`` [n, T+1] (weights [n] global), split over ranks."""
    info = session.dist
    mine = slice(info.rank, None, info.world_size)
    local, w = windows[mine], weights[mine]
    if local.shape[0] == 0:
        grads = {n: torch.zeros_like(p, dtype=torch.float32)
                 for n, p in session.model.named_parameters() if p.requires_grad}
    else:
        grads = loss_gradient(session.model, local, w, chunk_size=session.cfg.eval.batch_size,
                              autocast=session.autocast)
    return _all_reduce_direction(session, grads)


def target_window_subset(n: int, size: int, seed: int, step: int) -> np.ndarray:
    """Sorted indices of ``size`` of the ``n`` probe windows (all when size is 0 or >= n),
    drawn without replacement from a generator seeded by (seed, step): a new subset at every
    step, the same one when a step is replayed after a resume."""
    if size <= 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([_TARGET_TAG, seed, step + 1]).choice(n, size, replace=False))


def target_gradient(session: Session, windows: int = 0, step: int = 0) -> Direction:
    """Gradient of the mean loss over the target's probe windows (the only part methods see),
    or over a seeded subset of ``windows`` of them at this ``step`` (see
    ``target_window_subset``), which bounds the cost when the probe part is large."""
    if session.target is None:
        raise ConfigError(
            "this mixer aligns with a target: set target.path (a few documents) or target.domain."
        )
    probe = session.target.probe
    pick = target_window_subset(probe.shape[0], windows, session.cfg.train.seed, step)
    probe = probe[torch.from_numpy(pick)]
    return _window_gradient(session, probe, torch.full((probe.shape[0],), 1.0 / probe.shape[0]))


def validation_gradient(session: Session) -> Direction:
    """Gradient of the average over domains of each domain's mean loss on the mixer-eval
    validation windows (the loss ``eval_losses`` reports)."""
    sets = [session.signal_set.windows[d] for d in session.domains]
    windows = torch.cat(sets)
    weights = torch.cat([torch.full((w.shape[0],), 1.0 / (len(sets) * w.shape[0])) for w in sets])
    return _window_gradient(session, windows, weights)


@dataclass
class _Part:
    """One auxiliary batch of a measurement, as this rank sees it."""

    tokens: torch.Tensor
    """[n_local_kept, T+1] this rank's measured samples."""
    domains: np.ndarray
    """[n_local_kept] their domain indices."""
    local_mask: np.ndarray
    """[b] which of this rank's rows are measured."""
    global_mask: np.ndarray
    """[B] which rows of the whole (rank-gathered) batch are measured."""
    global_domains: np.ndarray
    """[B] domain index of every row of the whole batch."""


def _draw(session: Session, counts: np.ndarray) -> list[_Part]:
    """Measurement batches with exactly ``counts`` measured samples per domain, drawn from the
    auxiliary stream (see ``measurement_batches``)."""
    info = session.dist
    parts = []
    for draw, keep in measurement_batches(counts, session.cfg.train.batch_size):
        batch = session.aux_sampler.next_batch(counts=draw)
        local = batch.domains.numpy()
        gathered = all_gather_array(local, info).astype(np.int64)
        mask = keep_mask(gathered, keep)
        b = local.size
        mine = mask[info.rank * b:(info.rank + 1) * b]
        rows = torch.from_numpy(np.flatnonzero(mine))
        parts.append(_Part(batch.tokens[rows], local[mine], mine, mask, gathered))
    return parts


def domains_gradient(session: Session, counts: np.ndarray) -> Direction:
    """Σ_i ∇ mean_{x in domain i} ℓ_x on a fresh auxiliary batch with ``counts`` [m] samples per
    domain (domains with count 0 left out): DoGE's sum of domain gradients, in one backward."""
    grads = {n: torch.zeros_like(p, dtype=torch.float32)
             for n, p in session.model.named_parameters() if p.requires_grad}
    for part in _draw(session, counts):
        if part.tokens.shape[0] == 0:
            continue
        # Weight 1 / (count of the sample's domain): the sum of the per-domain means.
        w = torch.as_tensor(1.0 / counts[part.domains], dtype=torch.float32)
        g = loss_gradient(session.model, part.tokens, w, chunk_size=session.cfg.eval.batch_size,
                          autocast=session.autocast)
        grads = {n: grads[n] + g[n] for n in grads}
    return _all_reduce_direction(session, grads)


def domain_gradients(session: Session, counts: np.ndarray) -> list[Direction | None]:
    """[m] ∇ mean_{x in domain i} ℓ_x of each domain on one fresh auxiliary batch with
    ``counts`` [m] samples per domain (None for a domain with count 0): the per-domain gradients
    of DoGE's reference (Olivia-fsm/DoGE ``src/session.py:722-737``, one backward per domain).
    Memory: one gradient buffer per domain. Under ``torchrun`` each rank differentiates its rows
    and every gradient is all-reduced (the same collectives on every rank)."""
    grads: list[Direction | None] = [
        {n: torch.zeros_like(p, dtype=torch.float32)
         for n, p in session.model.named_parameters() if p.requires_grad} if c > 0 else None
        for c in counts
    ]
    for part in _draw(session, counts):
        for i, g in enumerate(grads):
            rows = np.flatnonzero(part.domains == i)
            if g is None or rows.size == 0:
                continue
            w = torch.full((rows.size,), 1.0 / float(counts[i]), dtype=torch.float32)
            gi = loss_gradient(session.model, part.tokens[torch.from_numpy(rows)], w,
                               chunk_size=session.cfg.eval.batch_size, autocast=session.autocast)
            for n in g:
                g[n] += gi[n]
    return [None if g is None else _all_reduce_direction(session, g) for g in grads]


def domain_gradient_gram(
    session: Session,
    step: int,
    counts: np.ndarray,
    target: bool = False,
    target_windows: int = 0,
    cache: dict[str, Any] | None = None,
) -> np.ndarray:
    """[k, k] float64 Gram matrix G_ab = <g_a, g_b> of the per-domain mean-loss gradients of
    ``domain_gradients`` (k = m) and, with ``target``, of the target's probe gradient as row and
    column m (k = m + 1; ``target_windows`` as in ``measure_alignments``, cached per step).
    Rows and columns of a domain with count 0 are NaN."""
    c = _check_counts(session, counts)
    if int(c.sum()) <= 0:
        raise ConfigError("domain_gradient_gram needs at least one sample.")
    grads = domain_gradients(session, c)
    if target:
        cache = {} if cache is None else cache
        key = f"direction:target:{target_windows}"
        if key not in cache:
            cache[key] = target_gradient(session, target_windows, step)
        grads.append(cache[key])
    k = len(grads)
    gram = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(a, k):
            ga, gb = grads[a], grads[b]
            if ga is not None and gb is not None:
                gram[a, b] = gram[b, a] = dot(ga, gb)
    return gram


def _probe_seed(session: Session, step: int, r: int) -> int:
    seq = np.random.SeedSequence([_PROBE_TAG, session.cfg.train.seed, step + 1, r])
    return int(seq.generate_state(1, dtype=np.uint64)[0] % (2**63))


def measure_alignments(
    session: Session,
    step: int,
    counts: np.ndarray,
    direction: str = "target",
    method: str = "jvp",
    precondition_with_adam: bool = False,
    probes: int = 0,
    cache: dict[str, Any] | None = None,
    target_windows: int = 0,
) -> SampleAlignments:
    """Per-sample ``<∇ℓ_x, P v>`` on a fresh measurement batch with exactly ``counts`` [m]
    samples per domain (any positive total), drawn global batch by global batch from
    ``session.aux_sampler``. ``direction`` is one of ``DIRECTIONS``; ``method`` "jvp" or "fd"
    (the finite difference runs in float32 without autocast: bf16 rounding would swamp the
    difference); ``probes`` adds that many seeded Gaussian directions (``probe_values``).
    ``cache`` (per step) keeps the target and validation gradients between calls of one step.
    ``target_windows`` > 0 computes the target gradient on a seeded subset of that many probe
    windows (new at every step) instead of all of them.
    The measured samples of a batch are its first ``keep[d]`` samples of each domain (padding
    of the last batch is read, never measured).
    """
    if direction not in DIRECTIONS:
        raise ConfigError(f"alignment direction {direction!r} is not one of {', '.join(map(repr, DIRECTIONS))}.")
    if method not in METHODS or method == "backward":
        raise ConfigError(f"alignment method {method!r} is not one of 'jvp', 'fd'.")
    if probes < 0 or target_windows < 0:
        raise ConfigError(f"probes and target_windows must be >= 0, got {probes}, {target_windows}.")
    c = _check_counts(session, counts)
    cache = {} if cache is None else cache
    if direction == "domains":
        v = domains_gradient(session, c)
    else:
        key = f"direction:{direction}:{target_windows if direction == 'target' else 0}"
        if key not in cache:
            cache[key] = (target_gradient(session, target_windows, step) if direction == "target"
                          else validation_gradient(session))
        v = cache[key]
    pv = precondition(v, session.optimizer, session.model) if precondition_with_adam else v
    sq = dot(v, pv)
    parts = _draw(session, c)
    domains = np.concatenate([p.global_domains[p.global_mask] for p in parts])
    autocast = contextlib.nullcontext if method == "fd" else session.autocast
    chunk = session.cfg.eval.batch_size

    def measure(d: Direction) -> np.ndarray:
        out = []
        for p in parts:
            # Every rank takes part in the gather, also one with no measured row in this batch.
            local = np.full(p.local_mask.size, np.nan)
            if p.tokens.shape[0]:
                local[p.local_mask] = per_sample_alignments(
                    session.model, p.tokens, d, method, chunk_size=chunk, autocast=autocast
                ).double().numpy()
            out.append(all_gather_array(local, session.dist)[p.global_mask])
        return np.concatenate(out)

    values = measure(pv)
    probe_values = np.zeros((probes, values.size))
    for r in range(probes):
        probe_values[r] = measure(gaussian_direction(session.model, _probe_seed(session, step, r)))
    return SampleAlignments(values=values, domains=domains, direction_sq_norm=sq, probe_values=probe_values)


def probe_texts(session: Session) -> list[str]:
    """The documents of the target's probe part, decoded from its windows (the windows were cut
    from one stream of the probe documents, each ending with EOS, so flattening them in order
    gives that stream back, up to the tail shorter than a window)."""
    assert session.target is not None
    stream = session.target.probe.reshape(-1).numpy()
    ends = np.flatnonzero(stream == session.data.eos_id)
    pieces = np.split(stream, ends + 1)
    tok = session.data.tokenizer()
    texts = [tok.decode([int(i) for i in p], skip_special_tokens=True) for p in pieces]
    return [t for t in texts if t.strip()]


def target_histogram(session: Session) -> np.ndarray:
    """[m] distribution of the target's probe documents over the run's domains (clusters).

    A target held out from one domain (``target.domain``) lies in that domain: one-hot. A
    target given as text (``target.path``) is cut and assigned to the fine clusters of a
    ``mixlab cluster`` data dir with its own embedder (``mixlab.data.cluster.cluster_histogram``,
    token-weighted) and restricted to the run's domains; on a data dir that is not clustered
    this raises a ``ConfigError`` that says to give the histogram as a mixer option instead.
    """
    cfg = session.cfg.target
    if not cfg.enabled or session.target is None:
        raise ConfigError(
            "this mixer needs the target's cluster histogram: set target.path or target.domain, "
            "or give mixer.options.histogram = {domain = weight, ...}."
        )
    if cfg.domain:
        if cfg.domain not in session.domains:
            raise ConfigError(
                f"target.domain '{cfg.domain}' is not one of the run's domains {session.domains}; "
                "give mixer.options.histogram instead."
            )
        h = np.zeros(session.m)
        h[session.domains.index(cfg.domain)] = 1.0
        return h
    from mixlab.data.cluster import cluster_histogram
    from mixlab.errors import DataError

    try:
        full = np.asarray(cluster_histogram(session.data, probe_texts(session)), dtype=np.float64)
    except DataError as exc:
        raise ConfigError(
            f"cannot assign the target '{cfg.path}' to clusters: {exc} Or give "
            "mixer.options.histogram = {domain = weight, ...} (the target's share per domain)."
        ) from None
    index = {d: i for i, d in enumerate(session.data.domains)}
    return np.array([full[index[d]] for d in session.domains])


def cluster_parents(session: Session) -> np.ndarray:
    """[m] int64 coarse-cluster index of each run domain, from the data dir manifest's
    ``extra["clusters"]["parents"]`` (written by ``mixlab cluster --coarse K1``): a list in the
    manifest's domain order, or a mapping from domain name to coarse index."""
    extra = session.data.manifest.extra or {}
    clusters = extra.get("clusters")
    parents = clusters.get("parents") if isinstance(clusters, dict) else None
    if parents is None:
        raise ConfigError(
            f"data dir '{session.cfg.data.dir}' has no cluster hierarchy (manifest extra "
            "'clusters.parents'); build it with `mixlab cluster --coarse K1`, or use the mixer "
            "without distribution reweighting."
        )
    names = session.data.domains
    if isinstance(parents, dict):
        lookup = {str(k): v for k, v in parents.items()}
    else:
        if len(parents) != len(names):
            raise ConfigError(
                f"manifest clusters.parents has {len(parents)} entries for {len(names)} domains."
            )
        lookup = dict(zip(names, parents))
    missing = [d for d in session.domains if d not in lookup]
    if missing:
        raise ConfigError(f"manifest clusters.parents has no entry for domain(s) {missing}.")
    out = np.array([int(lookup[d]) for d in session.domains], dtype=np.int64)
    if out.min() < 0:
        raise ConfigError("manifest clusters.parents holds a negative coarse index.")
    return out

