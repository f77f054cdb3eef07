"""k-means into a (flat or two-level) hierarchy of clusters: pure functions of arrays.

``fit_hierarchy`` fits, ``Hierarchy.assign`` is the one assignment rule used everywhere (nearest
coarse centroid, then the nearest fine centroid among its children), ``merge_small`` removes
clusters too small to use, ``canonical_order`` sorts clusters by size. No I/O, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixlab.errors import DataError

_DIST_ROWS = 4096
"""Rows of distances computed at once (bounds memory to _DIST_ROWS x k float64)."""


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances between rows of x [n, d] and c [k, d] (float64)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    return (x64 * x64).sum(1)[:, None] - 2.0 * (x64 @ c64.T) + (c64 * c64).sum(1)[None, :]


def _distinct(x: np.ndarray) -> int:
    return int(np.unique(x, axis=0).shape[0]) if x.shape[0] else 0


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """Centroids [k, d] float32 of k-means++ / Lloyd on x [n, d] (n >= k distinct points)."""
    if k == 1:
        return x.mean(0, keepdims=True).astype(np.float32)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed, algorithm="lloyd")
    return km.fit(x).cluster_centers_.astype(np.float32)


def allocate(k: int, capacity: np.ndarray) -> np.ndarray:
    """Fine clusters per coarse cluster: ``k`` shared equally, the remainder to the lowest
    indices (callers order coarse clusters largest first), no share above ``capacity[j]``
    (what it cannot take goes to the others). [K1] int64, summing to k."""
    capacity = np.asarray(capacity, dtype=np.int64)
    if capacity.sum() < k:
        raise DataError(f"only {int(capacity.sum())} distinct points for {k} clusters.")
    alloc = np.zeros_like(capacity)
    left = k
    while left:
        room = np.flatnonzero(alloc < capacity)
        share, extra = divmod(left, room.size)
        for i, j in enumerate(room.tolist()):
            give = min(int(capacity[j] - alloc[j]), share + (1 if i < extra else 0))
            alloc[j] += give
            left -= give
    return alloc


@dataclass
class Hierarchy:
    """Fine centroids [k, d] under coarse centroids [K, d]; ``parents`` [k] int64."""

    fine: np.ndarray
    coarse: np.ndarray
    parents: np.ndarray

    @property
    def k(self) -> int:
        return int(self.fine.shape[0])

    def assign(self, x: np.ndarray) -> np.ndarray:
        """[n] fine cluster of each row of x [n, d]: nearest coarse centroid, then the nearest
        fine centroid among its children (ties: lowest index)."""
        out = np.empty(x.shape[0], dtype=np.int64)
        for a in range(0, x.shape[0], _DIST_ROWS):
            xs = x[a : a + _DIST_ROWS]
            top = np.argmin(_sqdist(xs, self.coarse), axis=1)
            dist = _sqdist(xs, self.fine)
            dist[self.parents[None, :] != top[:, None]] = np.inf
            out[a : a + _DIST_ROWS] = np.argmin(dist, axis=1)
        return out

    def drop(self, j: int) -> Hierarchy:
        """Without fine cluster ``j`` (and without its coarse cluster if it was the only child)."""
        keep = np.arange(self.k) != j
        parents = self.parents[keep]
        used = np.unique(parents)
        remap = np.full(self.coarse.shape[0], -1, dtype=np.int64)
        remap[used] = np.arange(used.size)
        return Hierarchy(self.fine[keep], self.coarse[used], remap[parents])

    def reordered(self, fine_order: np.ndarray, coarse_order: np.ndarray) -> Hierarchy:
        """Fine clusters in ``fine_order`` and coarse ones in ``coarse_order`` (old indices)."""
        inv = np.empty_like(coarse_order)
        inv[coarse_order] = np.arange(coarse_order.size)
        return Hierarchy(
            self.fine[fine_order], self.coarse[coarse_order], inv[self.parents[fine_order]]
        )


def _sub_seed(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0])


def fit_hierarchy(x: np.ndarray, k: int, coarse: int, seed: int, n_init: int = 3) -> Hierarchy:
    """k-means on x [n, d]: flat (``coarse == 0``) or ``coarse`` clusters each split into fine
    ones, ``k`` fine clusters in all (see ``allocate``)."""
    n_distinct = _distinct(x)
    if n_distinct < k:
        raise DataError(
            f"only {n_distinct} distinct embeddings among {x.shape[0]} training units, fewer than "
            f"k = {k} clusters (identical texts embed identically); lower --k."
        )
    if coarse == 0:
        fine = kmeans(x, k, seed, n_init)
        return Hierarchy(
            fine, x.mean(0, keepdims=True).astype(np.float32), np.zeros(k, dtype=np.int64)
        )
    top_centroids = kmeans(x, coarse, seed, n_init)
    top = np.argmin(_sqdist(x, top_centroids), axis=1)
    sizes = np.bincount(top, minlength=coarse)
    # Largest coarse clusters first, so they get the remainder of an uneven split.
    order = np.lexsort((np.arange(coarse), -sizes))
    capacity = np.array([_distinct(x[top == j]) for j in order.tolist()], dtype=np.int64)
    alloc = np.empty(coarse, dtype=np.int64)
    alloc[order] = allocate(k, capacity)
    fines, parents, kept = [], [], []
    for j in range(coarse):
        if alloc[j] == 0:
            continue  # a coarse centroid no point is nearest to: dropped
        fines.append(kmeans(x[top == j], int(alloc[j]), _sub_seed(seed, j), n_init))
        parents.append(np.full(int(alloc[j]), len(kept), dtype=np.int64))
        kept.append(j)
    return Hierarchy(np.concatenate(fines), top_centroids[kept], np.concatenate(parents))


def merge_small(
    h: Hierarchy,
    emb: dict[str, np.ndarray],
    tokens: dict[str, np.ndarray],
    min_tokens: int,
) -> tuple[Hierarchy, dict[str, np.ndarray], list[dict[str, Any]]]:
    """Remove, smallest train share first, every cluster with fewer than ``min_tokens`` tokens
    in a split of ``emb`` (split -> [n, d] embeddings, ``tokens``: split -> [n] tokens), its
    units going to their next nearest cluster. Returns (hierarchy, split -> [n] labels, merged)."""
    merged: list[dict[str, Any]] = []
    while True:
        labels = {s: h.assign(x) for s, x in emb.items()}
        counts = {
            s: np.bincount(labels[s], weights=tokens[s], minlength=h.k).astype(np.int64)
            for s in emb
        }
        short = [c for c in range(h.k) if any(counts[s][c] < min_tokens for s in emb)]
        if not short:
            return h, labels, merged
        worst = min(short, key=lambda c: (counts["train"][c], c))
        lacking = [s for s in emb if counts[s][worst] < min_tokens]
        merged.append(
            {
                "tokens": {s: int(counts[s][worst]) for s in emb},
                "reason": f"fewer than {min_tokens} tokens in {', '.join(lacking)}",
            }
        )
        if h.k <= 2:
            raise DataError(
                f"after merging {len(merged)} cluster(s) with fewer than {min_tokens} tokens in "
                "a split, fewer than 2 clusters are left; lower --k or --min-tokens, or prepare "
                "the data with larger --val-fraction/--test-fraction."
            )
        h = h.drop(worst)


def canonical_order(h: Hierarchy, fine_tokens: np.ndarray) -> tuple[Hierarchy, np.ndarray]:
    """Coarse clusters by their tokens, then fine clusters by ``fine_tokens`` [k] within each
    coarse cluster, all descending (ties: old index). Returns (reordered hierarchy, [k] new
    index of each old fine cluster)."""
    coarse_tokens = np.bincount(h.parents, weights=fine_tokens, minlength=h.coarse.shape[0])
    coarse_order = np.lexsort((np.arange(coarse_tokens.size), -coarse_tokens))
    rank = np.empty_like(coarse_order)
    rank[coarse_order] = np.arange(coarse_order.size)
    fine_order = np.lexsort((np.arange(h.k), -np.asarray(fine_tokens), rank[h.parents]))
    new_index = np.empty(h.k, dtype=np.int64)
    new_index[fine_order] = np.arange(h.k)
    return h.reordered(fine_order, coarse_order), new_index


def cluster_names(parents: np.ndarray, hierarchical: bool) -> list[str]:
    """``c017`` (flat) or ``c03_12`` (coarse 3, its fine cluster 12), in domain order."""
    k = parents.size
    if not hierarchical:
        w = max(3, len(str(k - 1)))
        return [f"c{i:0{w}d}" for i in range(k)]
    wc = max(2, len(str(int(parents.max()))))
    counts = np.bincount(parents)
    wf = max(2, len(str(int(counts.max()) - 1)))
    local = np.arange(k) - (np.cumsum(counts) - counts)[parents]
    return [f"c{p:0{wc}d}_{i:0{wf}d}" for p, i in zip(parents.tolist(), local.tolist())]


def purity(tokens: np.ndarray) -> float:
    """Share of the mass of ``tokens`` [k, m] (cluster x source domain) that lies in its
    cluster's majority source domain (1.0 = every cluster holds one source domain)."""
    total = float(tokens.sum())
    return float(tokens.max(axis=1).sum()) / total if total else 0.0
