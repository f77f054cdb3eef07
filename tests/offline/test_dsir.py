"""DSIR: the hash is stable and spread, Gumbel top-k draws without replacement in proportion to
the weights, and on a synthetic pool the selection is mostly the documents like the target."""

from __future__ import annotations

import numpy as np
import pytest

from mixlab.errors import ConfigError
from mixlab.offline.dsir import (
    dsir_log_weights,
    dsir_select,
    gumbel_top_k,
    hashed_ngrams,
    log_distribution,
    ngram_counts,
    select_count,
)

VOCAB = 200


def _docs(n: int, perm: np.ndarray, rng: np.random.Generator, length: int = 80) -> list[np.ndarray]:
    """Zipf-like documents over the whole vocabulary, the ranks mapped through ``perm``: two
    permutations give two 'domains' with the same vocabulary and different frequent tokens."""
    p = 1.0 / np.arange(1, VOCAB + 1)
    p /= p.sum()
    return [perm[rng.choice(VOCAB, size=length, p=p)] for _ in range(n)]


def test_hashed_ngrams_counts_and_determinism():
    t = np.array([5, 7, 5, 7])
    ids = hashed_ngrams(t, 1000, ngrams=2)
    assert ids.shape == (4 + 3,)
    assert ids[0] == ids[2] and ids[1] == ids[3]  # same unigram, same bucket
    assert ids[4] == ids[6]  # the bigram (5, 7) twice
    np.testing.assert_array_equal(ids, hashed_ngrams(t.astype(np.uint16), 1000, 2))
    assert hashed_ngrams(np.array([3]), 1000, 3).shape == (1,)
    # Spread like random: 5000 distinct unigrams in 1000 buckets ~ Poisson(5) per bucket.
    counts = np.bincount(hashed_ngrams(np.arange(5000), 1000, 1), minlength=1000)
    assert (counts == 0).sum() < 20 and counts.max() <= 16
    assert 4.0 < counts.var() < 6.0


def test_log_distribution_is_a_smoothed_distribution():
    lp = log_distribution(np.array([3.0, 0.0, 1.0]), smoothing=0.5)
    np.testing.assert_allclose(np.exp(lp), [1.25, 0.5, 0.75])
    np.testing.assert_allclose(log_distribution(np.array([1.0, 0.0]))[1], np.log(1e-8))
    assert ngram_counts([np.array([1, 2, 3])], 50).sum() == 3 + 2


def test_gumbel_top_k_is_proportional_sampling_without_replacement():
    w = np.array([0.5, 0.3, 0.15, 0.05])
    first = np.zeros(4)
    for seed in range(4000):
        pick = gumbel_top_k(np.log(w), 1, seed)
        first[pick[0]] += 1
    np.testing.assert_allclose(first / first.sum(), w, atol=0.025)
    both = gumbel_top_k(np.log(w), 4, 0)
    np.testing.assert_array_equal(both, [0, 1, 2, 3])  # all of them, each once
    np.testing.assert_array_equal(gumbel_top_k(np.log(w), 2, 7), gumbel_top_k(np.log(w), 2, 7))
    with pytest.raises(ConfigError, match="cannot draw"):
        gumbel_top_k(np.log(w), 5, 0)


def test_dsir_selects_mostly_documents_like_the_target():
    rng = np.random.default_rng(0)
    perm_a, perm_b = rng.permutation(VOCAB), rng.permutation(VOCAB)
    pool = _docs(300, perm_a, rng) + _docs(300, perm_b, rng)  # first half like the target
    target = _docs(40, perm_a, rng)
    chosen, lw = dsir_select(pool, target, fraction=0.4, seed=0, buckets=2000)
    assert chosen.size == 240 and np.unique(chosen).size == 240
    share = float((chosen < 300).mean())
    assert share > 0.95, share
    assert lw[:300].mean() > lw[300:].mean()
    # With a fraction of 1 everything is kept; the draw is seeded.
    assert dsir_select(pool, target, 1.0)[0].size == 600
    np.testing.assert_array_equal(chosen, dsir_select(pool, target, 0.4, seed=0, buckets=2000)[0])


def test_bad_input_is_a_clear_error():
    doc = [np.array([1, 2, 3])]
    with pytest.raises(ConfigError, match="pool is empty"):
        dsir_log_weights([], doc)
    with pytest.raises(ConfigError, match="target set is empty"):
        dsir_log_weights(doc, [])
    for f in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
            select_count(10, f)
    assert select_count(10, 0.01) == 1 and select_count(10, 1.0) == 10
