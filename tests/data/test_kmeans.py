"""The pure k-means/hierarchy functions, on hand-made points with known answers."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="clustering needs pip install 'mixlab[cluster]'")

from mixlab.data.kmeans import (
    Hierarchy,
    allocate,
    canonical_order,
    cluster_names,
    fit_hierarchy,
    merge_small,
    purity,
)
from mixlab.errors import DataError


def _h() -> Hierarchy:
    """1-D: fine centroids 0, 1 under coarse 0.5, and 10 under coarse 10."""
    return Hierarchy(
        np.array([[0.0], [1.0], [10.0]], np.float32),
        np.array([[0.5], [10.0]], np.float32),
        np.array([0, 0, 1]),
    )


def test_assign_descends_the_hierarchy():
    x = np.array([[0.1], [0.9], [6.0], [4.0]], np.float32)
    # 6.0 is nearer coarse centroid 10.0 than 0.5; 4.0 is nearer 0.5, then fine centroid 1.0.
    assert _h().assign(x).tolist() == [0, 1, 2, 1]
    # 2.9 is nearest fine centroid 4.9 overall, but nearest coarse centroid 0.0: it follows
    # its coarse cluster to fine centroid 0.0.
    h = Hierarchy(
        np.array([[0.0], [4.9], [10.0]], np.float32),
        np.array([[0.0], [6.0]], np.float32),
        np.array([0, 1, 1]),
    )
    assert h.assign(np.array([[2.9]], np.float32)).tolist() == [0]
    assert h.assign(np.zeros((0, 1), np.float32)).shape == (0,)


def test_drop_removes_a_coarse_cluster_left_without_children():
    d = _h().drop(2)
    assert d.parents.tolist() == [0, 0] and d.coarse.shape == (1, 1)
    d = _h().drop(0)
    assert d.parents.tolist() == [0, 1] and d.fine[:, 0].tolist() == [1.0, 10.0]


def test_allocate_shares_equally_within_capacity():
    assert allocate(7, np.array([10, 10, 10])).tolist() == [3, 2, 2]
    assert allocate(7, np.array([1, 10, 2])).tolist() == [1, 4, 2]
    assert allocate(4, np.array([0, 9])).tolist() == [0, 4]
    with pytest.raises(DataError, match="only 2 distinct points for 7 clusters"):
        allocate(7, np.array([1, 1]))


def _blobs(seed: int = 0) -> np.ndarray:
    """Four tight 2-D blobs of 20 points: two near (0, 0), two near (100, 0)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0], [0, 10], [100, 0], [100, 10]], np.float32)
    return (np.repeat(centres, 20, axis=0) + rng.normal(0, 0.5, (80, 2))).astype(np.float32)


def test_fit_hierarchy_finds_nested_blobs_deterministically():
    x = _blobs()
    h = fit_hierarchy(x, k=4, coarse=2, seed=3, n_init=2)
    again = fit_hierarchy(x, k=4, coarse=2, seed=3, n_init=2)
    np.testing.assert_array_equal(h.fine, again.fine)
    assert sorted(np.bincount(h.parents).tolist()) == [2, 2]
    labels = h.assign(x)
    # Every blob is one fine cluster, and the two near blobs share a coarse parent.
    assert [len(set(labels[i * 20 : (i + 1) * 20].tolist())) for i in range(4)] == [1] * 4
    assert len(set(labels.tolist())) == 4
    assert h.parents[labels[0]] == h.parents[labels[20]] != h.parents[labels[40]]
    flat = fit_hierarchy(x, k=4, coarse=0, seed=3)
    assert flat.parents.tolist() == [0, 0, 0, 0] and flat.coarse.shape == (1, 2)
    with pytest.raises(DataError, match="only 1 distinct embeddings among 5 training units"):
        fit_hierarchy(np.ones((5, 2), np.float32), k=2, coarse=0, seed=0)


def test_merge_small_moves_units_to_the_next_nearest_cluster():
    x = {
        "train": np.array([[0.0], [0.2], [1.0], [10.0]], np.float32),
        "val": np.array([[0.1], [9.0]], np.float32),
    }
    tokens = {"train": np.array([5, 5, 5, 5]), "val": np.array([5, 5])}
    h, labels, merged = merge_small(_h(), x, tokens, min_tokens=5)
    # Fine cluster 1 (at 1.0) has no val token: merged into its sibling at 0.0.
    assert h.k == 2 and labels["train"].tolist() == [0, 0, 0, 1]
    assert merged == [{"tokens": {"train": 5, "val": 0}, "reason": "fewer than 5 tokens in val"}]
    with pytest.raises(DataError, match="fewer than 2 clusters are left"):
        merge_small(_h(), x, tokens, min_tokens=100)


def test_canonical_order_names_and_purity():
    h, new_index = canonical_order(_h(), np.array([1.0, 2.0, 10.0]))
    # Coarse 1 (10 tokens) before coarse 0 (3 tokens); inside coarse 0, fine 1 before fine 0.
    assert new_index.tolist() == [2, 1, 0]
    assert h.parents.tolist() == [0, 1, 1] and h.fine[:, 0].tolist() == [10.0, 1.0, 0.0]
    assert cluster_names(np.array([0, 0, 1]), hierarchical=True) == ["c00_00", "c00_01", "c01_00"]
    assert cluster_names(np.zeros(3, np.int64), hierarchical=False) == ["c000", "c001", "c002"]
    assert cluster_names(np.zeros(1001, np.int64), hierarchical=False)[-1] == "c1000"
    assert purity(np.array([[3, 1], [0, 4]])) == 7 / 8
    assert purity(np.zeros((2, 2))) == 0.0
