"""The mixture sampler: training batches whose domains follow a mixture given at every step.

A ``MixtureSampler`` is told, before every batch, either a distribution over domains
(``weights``: the domain of each sample is drawn i.i.d. from it) or an exact composition
(``counts``: that many samples of each domain, in shuffled order). It never reads state shared
with the model. Everything it does is a function of its constructor arguments, the weights or
counts it was given, and the step number, so a resumed run sees exactly the batches an
uninterrupted run would have seen.

Random streams (all ``numpy`` PCG64 generators built from a ``SeedSequence``; the first word is
a tag so that no two streams coincide):

- order of domain ``d``'s windows in epoch ``e``: ``(TAG_ORDER, seed, crc32(d), e)``; every
  method with the same seed sees the same data order inside a domain;
- domain assignment of step ``t``: ``(TAG_STEP, seed, t)``; the same on every rank;
- evaluation subset of domain ``d``: ``(TAG_EVAL, seed, crc32(d))`` (see ``eval_windows``).

Samples are *windows* of ``seq_len + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``) as defined
in ``mixlab.data.format``. Inside a batch, the samples of one domain take that domain's next
windows in batch order; a domain whose windows are exhausted starts a new epoch with a fresh
permutation, and the repeat is visible in ``epochs``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mixlab.data.format import DataDir, DomainSplit
from mixlab.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 1
"""Version of the dict written by ``MixtureSampler.state_dict``."""

TAG_ORDER = 0x4F524452
"""First seed word of the per-domain, per-epoch window order ("ORDR")."""
TAG_STEP = 0x53544550
"""First seed word of each step's domain assignment ("STEP")."""
TAG_EVAL = 0x4556414C
"""First seed word of the evaluation subsets ("EVAL"), distinct from every training stream."""

WEIGHTS_ATOL = 1e-6
"""How far from 1 the sum of the weights may be."""


def _generator(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))


def _crc(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _runs(*keys: np.ndarray) -> list[np.ndarray]:
    """Row indices grouped by equal key tuples, groups in ascending key order.

    ``keys`` are [k] arrays; the last one is the primary sort key (as in ``np.lexsort``).
    Returns a list of index arrays that partition ``range(k)``.
    """
    order = np.lexsort(keys)
    if order.size == 0:
        return []
    change = np.zeros(order.size - 1, dtype=bool)
    for key in keys:
        sorted_key = key[order]
        change |= sorted_key[1:] != sorted_key[:-1]
    return np.split(order, np.flatnonzero(change) + 1)


def _int_arg(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _too_small(ds: DomainSplit, seq_len: int) -> DataError:
    largest = max((sh.tokens for sh in ds.info.shards), default=0)
    shards = f" (largest shard {largest} tokens)" if len(ds.info.shards) > 1 else ""
    return DataError(
        f"domain '{ds.domain}' is too small for seq_len {seq_len}: its '{ds.split}' split has "
        f"{ds.n_tokens} tokens{shards}, and one window needs seq_len + 1 = {seq_len + 1} tokens "
        "inside one shard. Use a smaller seq_len, add text to the domain, or leave it out."
    )


# ---------------------------------------------------------------------------------------------
# Reading windows.


class _WindowReader:
    """Windows of ``length`` tokens from the shards of one or more domain splits.

    Each shard is mapped once as a 2-D array ``[windows, length]``, so every window a batch
    takes from one shard comes out of a single fancy index (one gather in C) rather than one
    Python-level slice per window. Window ``w`` of domain ``d`` has the global id
    ``offset[d] + w``; shards of all domains are laid end to end in that id space.
    """

    def __init__(self, splits: Sequence[DomainSplit], length: int):
        self.length = length
        self.dtype = splits[0].dtype
        self._paths = [ds.root / sh.bin for ds in splits for sh in ds.info.shards]
        counts = [ds.window_counts(length) for ds in splits]
        self._shard_counts = np.concatenate(counts)
        self._shard_ends = np.cumsum(self._shard_counts)
        self._shard_starts = self._shard_ends - self._shard_counts
        per_domain = np.array([int(c.sum()) for c in counts], dtype=np.int64)
        self._offsets = np.cumsum(per_domain) - per_domain
        self._views: list[np.ndarray | None] = [None] * len(self._paths)

    def __getstate__(self) -> dict[str, Any]:
        # Copying or pickling a memmap copies the mapped tokens into memory (a whole shard);
        # drop the maps instead, they reopen on first use.
        return {**self.__dict__, "_views": [None] * len(self._paths)}

    def _view(self, s: int) -> np.ndarray:
        v = self._views[s]
        if v is None:
            # Only the first ``windows * length`` tokens are mapped; a shard's short tail is unused.
            shape = (int(self._shard_counts[s]), self.length)
            v = np.memmap(self._paths[s], dtype=self.dtype, mode="r", shape=shape)
            self._views[s] = v
        return v

    def read(self, domain: np.ndarray, window: np.ndarray, out: np.ndarray) -> None:
        """Write the tokens of windows ``window`` [k] of domains ``domain`` [k] into ``out``
        [k, length] (int64). Indices must be in range (the caller checks)."""
        gid = self._offsets[domain] + window
        shard = np.searchsorted(self._shard_ends, gid, side="right")
        local = gid - self._shard_starts[shard]
        if shard.size and shard.min() == shard.max():
            out[:] = self._view(int(shard[0]))[local]
            return
        for rows in _runs(shard):
            out[rows] = self._view(int(shard[rows[0]]))[local[rows]]


# ---------------------------------------------------------------------------------------------
# Mixture arithmetic.


def closest_counts(weights: np.ndarray | Sequence[float], batch: int) -> np.ndarray:
    """The integer batch composition closest to ``weights`` (largest-remainder rounding).

    ``weights`` [m] is a distribution; returns [m] int64 counts summing to ``batch`` with
    ``|counts_i - batch * w_i| < 1``. Every domain gets ``floor(batch * w_i)``; the samples
    left over go one each to the largest fractional parts, ties to the lower domain index.
    Products are rounded to 1e-9 first so that float noise (0.29 * 100 = 28.999...) does
    not decide a tie.
    """
    w = _check_weights(weights, None, ConfigError)
    batch = _int_arg(batch, "batch", 1)
    raw = np.round(w * batch, 9)
    base = np.floor(raw).astype(np.int64)
    left = batch - int(base.sum())
    frac = raw - base
    # lexsort: last key is primary -> descending fraction, then ascending index.
    order = np.lexsort((np.arange(w.size), -frac))
    base[order[:left]] += 1
    return base


def _check_weights(
    weights: Any, names: Sequence[str] | None, error: type[Exception] = ConfigError
) -> np.ndarray:
    """``weights`` as float64 [m] divided by its sum, or ``error`` saying what is wrong."""
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise error(f"weights must be a vector of numbers, got {weights!r}.") from None
    if w.ndim != 1 or w.size == 0:
        raise error(f"weights must be a non-empty vector, got shape {w.shape}.")
    if names is not None and w.size != len(names):
        raise error(
            f"weights have {w.size} entries; expected {len(names)}, one per domain "
            f"({', '.join(names)})."
        )
    label = list(names) if names is not None else [str(i) for i in range(w.size)]
    bad = [label[i] for i in np.flatnonzero(~np.isfinite(w))]
    if bad:
        raise error(f"weights contain NaN or infinity (domain {', '.join(bad)}): {w.tolist()}.")
    neg = [label[i] for i in np.flatnonzero(w < 0)]
    if neg:
        raise error(
            f"weights must be non-negative; negative for domain {', '.join(neg)}: {w.tolist()}."
        )
    total = float(w.sum())
    if abs(total - 1.0) > WEIGHTS_ATOL:
        raise error(f"weights must sum to 1 (within {WEIGHTS_ATOL:g}); they sum to {total:.9g}.")
    return w / total


def _check_counts(counts: Any, names: Sequence[str], batch: int) -> np.ndarray:
    """``counts`` as int64 [m], or ``ConfigError`` saying what is wrong."""
    try:
        c = np.asarray(counts)
        f = c.astype(np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"counts must be a vector of integers, got {counts!r}.") from None
    if c.ndim != 1 or c.size != len(names):
        raise ConfigError(
            f"counts must have {len(names)} entries, one per domain ({', '.join(names)}); "
            f"got shape {c.shape}."
        )
    if c.dtype == bool or not np.all(np.isfinite(f)) or np.any(f != np.round(f)):
        raise ConfigError(f"counts must be integers: {c.tolist()}.")
    c = f.astype(np.int64)
    if np.any(c < 0):
        raise ConfigError(f"counts must be non-negative: {c.tolist()}.")
    if int(c.sum()) != batch:
        raise ConfigError(
            f"counts sum to {int(c.sum())}; they must sum to the global batch size {batch}."
        )
    return c


def _categorical(rng: np.random.Generator, p: np.ndarray, k: int) -> np.ndarray:
    """[k] i.i.d. draws from distribution ``p``; a zero-weight domain is never drawn."""
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    # side="right": u lands past every cdf entry <= u, so a domain with cdf equal to its
    # predecessor's (weight 0) can never be returned.
    return np.searchsorted(cdf, rng.random(k), side="right").astype(np.int64)


def _rank_in_group(group: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[k] how many earlier entries of ``group`` [k] have the same value (0, 1, 2, ...)."""
    order = np.argsort(group, kind="stable")
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(group.size, dtype=np.int64)
    rank[order] = np.arange(group.size, dtype=np.int64) - starts[group[order]]
    return rank


# ---------------------------------------------------------------------------------------------
# The sampler.


@dataclass(frozen=True)
class Batch:
    """This rank's share of one global batch."""

    tokens: torch.Tensor
    """LongTensor [b, seq_len + 1]; inputs are ``[:, :-1]``, targets ``[:, 1:]``."""
    domains: torch.Tensor
    """LongTensor [b] domain index of each sample (in the sampler's domain order)."""
    windows: torch.Tensor
    """LongTensor [b] window index of each sample inside its domain's split (the sample's id)."""
    step: int
    """The sampler step this batch belongs to (0 for the first batch)."""
    global_counts: np.ndarray
    """[m] int64 samples of each domain in the whole global batch (all ranks)."""


class MixtureSampler:
    """Batches of ``seq_len + 1``-token windows whose domains follow a mixture set per step.

    ``global_batch`` counts samples over all ranks; this rank gets ``global_batch //
    world_size`` of them, the slice ``[rank * b, (rank + 1) * b]`` of the global batch. Every
    rank draws the whole global assignment and advances every domain's cursor, so all ranks
    hold the same state and together see exactly the one-rank batch.
    """

    def __init__(
        self,
        data: DataDir,
        split: str,
        seq_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        domains: list[str] | None = None,
    ):
        self.seq_len = _int_arg(seq_len, "seq_len", 1)
        self.global_batch = _int_arg(global_batch, "global batch size", 1)
        self.seed = _int_arg(seed, "seed", 0)
        self.world_size = _int_arg(world_size, "world size", 1)
        self.rank = _int_arg(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank {rank} is out of range for world size {world_size}.")
        if self.global_batch % self.world_size:
            raise ConfigError(
                f"global batch size {global_batch} is not divisible by the world size "
                f"{world_size}; use a multiple of {world_size}."
            )
        self.split = split
        names = list(data.domains if domains is None else domains)
        if not names:
            raise ConfigError("the sampler needs at least one domain.")
        unknown = [n for n in names if n not in data.domains]
        if unknown:
            raise DataError(
                f"unknown domain {', '.join(repr(n) for n in unknown)}; this data dir has: "
                f"{', '.join(data.domains)}."
            )
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"domain {', '.join(repr(n) for n in twice)} listed more than once.")
        self._names = names
        length = self.seq_len + 1
        splits = [data.split(n, split) for n in names]
        self._n_windows = np.array([ds.n_windows(length) for ds in splits], dtype=np.int64)
        for ds, n in zip(splits, self._n_windows):
            if n == 0:
                raise _too_small(ds, self.seq_len)
        self._crc = [_crc(n) for n in names]
        self._reader = _WindowReader(splits, length)
        self._drawn = np.zeros(len(names), dtype=np.int64)
        self._step = 0
        self._weights: np.ndarray | None = None
        # Domain -> (epoch, permutation): only the epoch a cursor is in is kept, so a huge
        # domain's permutation is built once per epoch, never per batch.
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    # -- read-only views ----------------------------------------------------------------------

    @property
    def domains(self) -> list[str]:
        """Domain names, in the order of every [m] array of this sampler."""
        return list(self._names)

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank (``global_batch // world_size``)."""
        return self.global_batch // self.world_size

    @property
    def step(self) -> int:
        """Number of batches drawn so far (the step of the next batch)."""
        return self._step

    @property
    def n_windows(self) -> np.ndarray:
        """[m] int64 windows available in each domain's split."""
        return self._n_windows.copy()

    @property
    def windows_drawn(self) -> np.ndarray:
        """[m] int64 windows drawn so far per domain, all ranks together."""
        return self._drawn.copy()

    @property
    def tokens_drawn(self) -> np.ndarray:
        """[m] int64 training tokens drawn so far per domain (``seq_len`` per sample, all ranks),
        so that the sum equals the run's token count (steps × global batch × seq_len)."""
        return self._drawn * self.seq_len

    @property
    def epochs(self) -> np.ndarray:
        """[m] float64 windows drawn / windows available: 2.5 means every window was seen twice
        and half of them a third time."""
        return self._drawn / self._n_windows

    @property
    def weights(self) -> np.ndarray | None:
        """[m] the last weights given (reused when ``next_batch`` gets neither), or None."""
        return None if self._weights is None else self._weights.copy()

    # -- drawing ------------------------------------------------------------------------------

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        """[n_windows[d]] window order of domain ``d`` in ``epoch`` (cached for one epoch)."""
        cached = self._perms.get(d)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = int(self._n_windows[d])
        # int32 halves the memory of a huge domain's permutation.
        perm = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        _generator(TAG_ORDER, self.seed, self._crc[d], epoch).shuffle(perm)
        self._perms[d] = (epoch, perm)
        return perm

    def _windows_at(self, domain: np.ndarray, position: np.ndarray) -> np.ndarray:
        """[k] window indices at cursor positions ``position`` [k] of domains ``domain`` [k]."""
        n = self._n_windows[domain]
        epoch = position // n
        index = position - epoch * n
        out = np.empty(domain.size, dtype=np.int64)
        # Groups in ascending (domain, epoch) order, so each domain's cache moves forward only.
        for rows in _runs(epoch, domain):
            perm = self._permutation(int(domain[rows[0]]), int(epoch[rows[0]]))
            out[rows] = perm[index[rows]]
        return out

    def next_batch(
        self,
        weights: np.ndarray | Sequence[float] | None = None,
        counts: np.ndarray | Sequence[int] | None = None,
    ) -> Batch:
        """Draw the next batch.

        ``weights`` [m]: each sample's domain is drawn i.i.d. from this distribution (it is
        remembered: a later call with neither argument reuses it). ``counts`` [m]: exactly
        ``counts[i]`` samples of domain i (ints summing to the global batch), in an order
        shuffled by the step's generator. Pass one of them, or neither to reuse the last
        weights.
        """
        m = len(self._names)
        if weights is not None and counts is not None:
            raise ConfigError("pass weights or counts to next_batch, not both.")
        rng = _generator(TAG_STEP, self.seed, self._step)
        if counts is not None:
            c = _check_counts(counts, self._names, self.global_batch)
            assign = rng.permutation(np.repeat(np.arange(m, dtype=np.int64), c))
        else:
            if weights is not None:
                self._weights = _check_weights(weights, self._names)
            elif self._weights is None:
                raise ConfigError(
                    "next_batch needs weights (or counts) on its first call; later calls "
                    "without either reuse the last weights."
                )
            assign = _categorical(rng, self._weights, self.global_batch)
        global_counts = np.bincount(assign, minlength=m).astype(np.int64)
        # A sample's cursor position: its domain's windows drawn before this batch plus the
        # number of same-domain samples ahead of it in the global batch.
        position = self._drawn[assign] + _rank_in_group(assign, global_counts)
        b = self.batch_size
        mine = slice(self.rank * b, (self.rank + 1) * b)
        domain, position = assign[mine], position[mine]
        windows = self._windows_at(domain, position)
        tokens = np.empty((b, self.seq_len + 1), dtype=np.int64)
        self._reader.read(domain, windows, tokens)
        # State moves only once the batch is complete, so a failed read can be retried.
        self._drawn += global_counts
        batch = Batch(
            tokens=torch.from_numpy(tokens),
            domains=torch.from_numpy(domain.copy()),
            windows=torch.from_numpy(windows),
            step=self._step,
            global_counts=global_counts,
        )
        self._step += 1
        return batch

    # -- checkpointing ------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "domains": list(self._names),
            "split": self.split,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "n_windows": [int(n) for n in self._n_windows],
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream, as plain ints, floats, strings and lists
        (loads with ``torch.load(weights_only=True)``). The same on every rank."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "world_size": self.world_size,
            "step": self._step,
            "drawn": [int(x) for x in self._drawn],
            "weights": None if self._weights is None else [float(x) for x in self._weights],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuse (``CheckpointError``) a state of another setup."""
        if not isinstance(state, dict):
            raise CheckpointError(f"sampler state must be a dict, got {type(state).__name__}.")
        missing = [
            k
            for k in ("version", "world_size", "step", "drawn", "weights", *self._identity())
            if k not in state
        ]
        if missing:
            raise CheckpointError(f"sampler state is incomplete: missing {', '.join(missing)}.")
        if state["version"] != STATE_VERSION:
            raise CheckpointError(
                f"sampler state version {state['version']} is not supported (this mixlab "
                f"writes version {STATE_VERSION})."
            )
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"the checkpoint's sampler ran with world size {state['world_size']}, this run "
                f"has {self.world_size}; resuming on a different number of ranks is not "
                "supported. Resume with the same number of processes."
            )
        diffs = [
            f"{key}: {state[key]!r} in the checkpoint, {mine!r} here"
            for key, mine in self._identity().items()
            if state[key] != mine
        ]
        if diffs:
            hint = (
                " (the data dir changed)" if any(d.startswith("n_windows") for d in diffs) else ""
            )
            raise CheckpointError(
                "the checkpoint's sampler does not match this one"
                + hint
                + ": "
                + "; ".join(diffs)
                + "."
            )
        step, drawn = state["step"], state["drawn"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"sampler state has an invalid step {step!r}.")
        if (
            not isinstance(drawn, list)
            or len(drawn) != len(self._names)
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in drawn)
        ):
            raise CheckpointError(f"sampler state has invalid window counts {drawn!r}.")
        weights = state["weights"]
        if weights is not None:
            weights = _check_weights(weights, self._names, CheckpointError)
        self._step = step
        self._drawn = np.array(drawn, dtype=np.int64)
        self._weights = weights


# ---------------------------------------------------------------------------------------------
# Evaluation subsets.


def _permutation_prefix(rng: np.random.Generator, n_total: int, n: int) -> np.ndarray:
    """The first ``n`` entries [n] of a uniformly random permutation of ``range(n_total)``.

    Forward Fisher-Yates stopped after ``n`` swaps, with the swapped-out entries kept in a
    dict: O(n) time and memory however large ``n_total`` is, and the first n entries for a
    larger ``n`` start with those for a smaller one (a bigger subset contains a smaller).
    """
    targets = rng.integers(np.arange(n, dtype=np.int64), n_total)  # target_i uniform on [i, N)
    moved: dict[int, int] = {}
    out: list[int] = []
    for i, j in enumerate(targets.tolist()):
        out.append(moved.get(j, j))
        # Position j now holds what was at position i; later swaps only read positions > i.
        moved[j] = moved.get(i, i)
    return np.array(out, dtype=np.int64)


def eval_windows(
    data: DataDir, domain: str, split: str, n: int, seq_len: int, seed: int
) -> np.ndarray:
    """A fixed, seeded subset of ``min(n, available)`` window indices of a domain split.

    The subset is the first ``n`` of a permutation seeded by ``(TAG_EVAL, seed,
    crc32(domain))``, returned sorted ascending [k] int64 (sorted reads are sequential on
    disk); every window when ``n`` is at least the number available. The same seed gives every
    method the same subset, and a larger ``n`` gives a superset.
    """
    n = _int_arg(n, "number of evaluation windows", 0)
    seq_len = _int_arg(seq_len, "seq_len", 1)
    seed = _int_arg(seed, "seed", 0)
    ds = data.split(domain, split)
    total = ds.n_windows(seq_len + 1)
    if total == 0:
        raise _too_small(ds, seq_len)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    return np.sort(_permutation_prefix(_generator(TAG_EVAL, seed, _crc(domain)), total, n))


def eval_batches(
    data: DataDir,
    domain: str,
    split: str,
    windows: np.ndarray,
    seq_len: int,
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """Yield the tokens of ``windows`` [k] (indices in a domain split) in order, as LongTensors
    [≤ batch_size, seq_len + 1]; only the last batch may be shorter."""
    seq_len = _int_arg(seq_len, "seq_len", 1)
    batch_size = _int_arg(batch_size, "batch size", 1)
    ds = data.split(domain, split)
    windows = np.asarray(windows, dtype=np.int64).reshape(-1)
    total = ds.n_windows(seq_len + 1)
    if windows.size and (windows.min() < 0 or windows.max() >= total):
        raise DataError(
            f"window index out of range for {domain}/{split} ({total} windows of "
            f"{seq_len + 1} tokens)."
        )
    reader = _WindowReader([ds], seq_len + 1)
    zero = np.zeros(batch_size, dtype=np.int64)
    for start in range(0, windows.size, batch_size):
        chunk = windows[start : start + batch_size]
        out = np.empty((chunk.size, seq_len + 1), dtype=np.int64)
        reader.read(zero[: chunk.size], chunk, out)
        yield torch.from_numpy(out)
