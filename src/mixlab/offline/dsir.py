"""DSIR: data selection with importance resampling over hashed n-gram features (pure math).

Xie, Santurkar, Ma, Liang, "Data Selection for Language Models via Importance Resampling",
NeurIPS 2023 (arXiv 2302.03169; reference code p-lambda/dsir).

A document x is represented by the bag of its hashed n-grams (n = 1..``ngrams``, each n-gram
hashed into one of ``buckets`` bins). Two bag-of-n-grams models are fitted, one on the target
set and one on the raw pool: p_T[f] and p_R[f], the share of all n-grams in bucket f plus
``smoothing`` (1e-8, as in the reference code). Under these models the importance weight of x is

    log w(x) = Σ_f count_f(x) (log p_T[f] - log p_R[f])

(a sum over the document's n-grams, so it grows with length: DSIR compares pieces of similar
length, which is why ``mixlab select`` cuts documents into pieces first). k documents are then
drawn *without replacement* with probability proportional to w by the Gumbel top-k trick: the
k largest log w(x) + G_x, G_x ~ Gumbel(0, 1) i.i.d. (seeded), are exactly a sequential draw
without replacement proportional to w.

Here documents are token ids, not text: the n-grams are of token ids, which needs no raw text
and no second tokenizer, and works on any data dir.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from mixlab.errors import ConfigError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 [n] (wrapping arithmetic): a well-spread hash."""
    with np.errstate(over="ignore"):
        x = (x + _GOLDEN).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def hashed_ngrams(tokens: np.ndarray, buckets: int, ngrams: int = 2) -> np.ndarray:
    """int64 [k] bucket of every n-gram (n = 1..``ngrams``) of ``tokens`` [L] (token ids).

    An n-gram (t_1..t_n) hashes to mix(n, t_1, ..., t_n) mod ``buckets``: unigram a, bigram
    (a, b) and trigram (a, b, c) land in independent buckets. k = Σ_n max(0, L - n + 1).
    """
    t = np.asarray(tokens).astype(np.uint64, copy=False)
    out = []
    for n in range(1, ngrams + 1):
        if t.size < n:
            break
        h = _mix64(np.full(t.size - n + 1, n, dtype=np.uint64))
        for j in range(n):
            with np.errstate(over="ignore"):
                h = _mix64(h ^ t[j : t.size - n + 1 + j])
        out.append((h % np.uint64(buckets)).astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def ngram_counts(docs: Iterable[np.ndarray], buckets: int, ngrams: int = 2) -> np.ndarray:
    """float64 [buckets] n-gram counts summed over ``docs`` (token id arrays)."""
    counts = np.zeros(buckets, dtype=np.float64)
    for d in docs:
        counts += np.bincount(hashed_ngrams(d, buckets, ngrams), minlength=buckets)
    return counts


def log_distribution(counts: np.ndarray, smoothing: float = 1e-8) -> np.ndarray:
    """[B] log(counts / Σ counts + ``smoothing``): the bucket distribution, smoothed as the
    reference code does (1e-8 added to each probability, so an n-gram the target never shows
    costs about log(1e-8) ≈ -18.4 per occurrence)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() <= 0:
        raise ConfigError("n-gram counts are all zero (no document with a token).")
    if smoothing <= 0:
        raise ConfigError(f"smoothing must be > 0, got {smoothing}.")
    return np.log(c / c.sum() + smoothing)


def log_importance(
    docs: Sequence[np.ndarray], log_ratio: np.ndarray, ngrams: int = 2
) -> np.ndarray:
    """float64 [n] log w(x) = Σ over x's n-grams of ``log_ratio`` [B] (= log p_T - log p_R)."""
    buckets = log_ratio.size
    return np.array(
        [float(log_ratio[hashed_ngrams(d, buckets, ngrams)].sum()) for d in docs], dtype=np.float64
    )


def gumbel_top_k(log_weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """int64 [k] indices drawn without replacement with probability ∝ exp(``log_weights``),
    sorted ascending. Seeded: the same (weights, k, seed) always gives the same draw."""
    lw = np.asarray(log_weights, dtype=np.float64)
    n = lw.size
    if not 0 <= k <= n:
        raise ConfigError(f"cannot draw {k} of {n} documents without replacement.")
    if not np.all(np.isfinite(lw)):
        raise ConfigError("importance weights contain NaN or infinity.")
    keys = lw + np.random.default_rng([seed, 0xD51]).gumbel(size=n)
    return np.sort(np.argsort(-keys, kind="stable")[:k]).astype(np.int64)


def dsir_log_weights(
    pool: Sequence[np.ndarray],
    target: Sequence[np.ndarray],
    buckets: int = 10_000,
    ngrams: int = 2,
    smoothing: float = 1e-8,
) -> np.ndarray:
    """[n] log importance weight of each pool document against the target set.

    ``pool`` and ``target``: token id arrays (EOS removed). Both must hold at least one document.
    """
    if buckets < 1 or ngrams < 1:
        raise ConfigError(f"buckets ({buckets}) and ngrams ({ngrams}) must be >= 1.")
    if len(pool) == 0:
        raise ConfigError("the pool is empty: there is nothing to select from.")
    if len(target) == 0:
        raise ConfigError("the target set is empty: give at least one target document.")
    log_t = log_distribution(ngram_counts(target, buckets, ngrams), smoothing)
    log_r = log_distribution(ngram_counts(pool, buckets, ngrams), smoothing)
    return log_importance(pool, log_t - log_r, ngrams)


def select_count(n: int, fraction: float) -> int:
    """Documents to keep out of ``n`` for ``fraction`` in (0, 1]: round(f·n), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}.")
    if n == 0:
        raise ConfigError("the pool is empty: there is nothing to select from.")
    return max(1, min(n, round(fraction * n)))


def dsir_select(
    pool: Sequence[np.ndarray],
    target: Sequence[np.ndarray],
    fraction: float,
    seed: int = 0,
    buckets: int = 10_000,
    ngrams: int = 2,
    smoothing: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """(selected indices [k] ascending, log weights [n]): DSIR keeps ``fraction`` of ``pool``."""
    k = select_count(len(pool), fraction)
    lw = dsir_log_weights(pool, target, buckets, ngrams, smoothing)
    return gumbel_top_k(lw, k, seed), lw
