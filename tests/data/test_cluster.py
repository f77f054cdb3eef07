"""Clustering a prepared data dir into cluster domains (tfidf embedder, small real text).

The module fixture prepares a data dir with three clearly different domains: Python source of
the standard library (code), licence-like prose (legal) and recipes (cooking), built
deterministically, then clusters it once into 3 coarse x 6 fine clusters. Each test reads that
output or makes its own.
"""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="clustering needs pip install 'mixlab[cluster]'")

from mixlab.cli import main
from mixlab.data.cluster import (
    ClusterConfig,
    Clustering,
    assign,
    build_units,
    cluster,
    cluster_histogram,
    piece_bounds,
)
from mixlab.data.format import SPLITS, DataDir
from mixlab.data.kmeans import cluster_names, purity
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.data.tokenizer import decode
from mixlab.errors import ConfigError, DataError, MixlabError

_CLAUSES = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED",
    "Redistributions of source code must retain the above copyright notice and this list of conditions",
    "IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY",
    "The licensee may distribute the licensed work only under the terms of this license agreement",
    "Neither the name of the copyright holder nor the names of its contributors may be used to endorse",
    "This license shall be governed by and construed in accordance with the laws of the jurisdiction",
    "Any termination of this license shall not affect the rights granted to recipients of the work",
]
_FOODS = [
    "flour",
    "butter",
    "eggs",
    "sugar",
    "onions",
    "garlic",
    "tomatoes",
    "rice",
    "lentils",
    "carrots",
    "cream",
    "basil",
    "lemon",
    "chicken stock",
    "potatoes",
    "spinach",
]
_STEPS = [
    "Preheat the oven to {n}0 degrees and grease a baking tin.",
    "Chop the {a} finely and fry them in a little oil until golden.",
    "Whisk the {a} with the {b} in a large bowl.",
    "Simmer the {a} gently for {n} minutes, stirring now and then.",
    "Season with salt and pepper, then fold in the {b}.",
    "Bake for {n}5 minutes until risen and brown on top.",
    "Serve warm with a spoonful of {a} and fresh {b}.",
]


def _write_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    import calendar
    import difflib
    import heapq
    import shlex
    import textwrap

    (root / "code").mkdir(parents=True)
    lines = [
        ln
        for m in (textwrap, difflib, heapq, shlex, calendar)
        for ln in inspect.getsource(m).splitlines()
    ]
    for i in range(60):
        (root / "code" / f"{i:03d}.txt").write_text("\n".join(lines[i * 40 : (i + 1) * 40]))
    (root / "legal").mkdir()
    for i in range(60):
        body = ". ".join(rng.choice(_CLAUSES, size=int(rng.integers(5, 10))).tolist())
        (root / "legal" / f"{i:03d}.txt").write_text(
            f"Copyright (c) {1990 + i} Holder {i}. All rights reserved.\n\n{body}."
        )
    (root / "cooking").mkdir()
    for i in range(60):
        steps = [
            rng.choice(_STEPS).format(
                a=rng.choice(_FOODS), b=rng.choice(_FOODS), n=int(rng.integers(1, 9))
            )
            for _ in range(int(rng.integers(6, 12)))
        ]
        (root / "cooking" / f"{i:03d}.txt").write_text(f"Recipe {i}\n\n" + " ".join(steps))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(root / "text")
    cfg = PrepareConfig(
        source=str(root / "text"),
        out=str(root / "data"),
        vocab_size=600,
        val_fraction=0.15,
        test_fraction=0.15,
    )
    return prepare(cfg).root


def _cfg(prepared: Path, out: Path, **kw) -> ClusterConfig:
    base = dict(
        data=str(prepared),
        out=str(out),
        k=6,
        coarse=3,
        embedder="tfidf",
        embedder_options={"dim": 16},
        chunk_tokens=200,
        min_tokens=1,
        n_init=2,
        cache_dir=str(out.parent / "cache"),
    )
    return ClusterConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def clustered(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clustered") / "c"
    return cluster(_cfg(prepared, out)).root


def _units(data: DataDir, split: str) -> np.ndarray:
    return np.load(data.root / data.manifest.extra["clusters"]["units"][split])


def _source_texts(prepared: Path, split: str) -> tuple[list[str], list[str]]:
    src = DataDir.open(prepared)
    tok = src.tokenizer()
    texts, domains = [], []
    for d in src.domains:
        ds = src.split(d, split)
        for j in range(ds.n_docs):
            texts.append(decode(tok, ds.document(j)))
            domains.append(d)
    return texts, domains


def test_output_is_a_data_dir_with_the_same_tokenizer(prepared, clustered):
    src, out = DataDir.open(prepared), DataDir.open(clustered)
    m, info = out.manifest, out.manifest.extra["clusters"]
    assert (m.tokenizer_sha256, m.vocab_size, m.eos_id, m.dtype) == (
        src.manifest.tokenizer_sha256,
        src.vocab_size,
        src.eos_id,
        src.manifest.dtype,
    )
    assert (clustered / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    assert info["k"] == len(out.domains) == 6 and info["coarse_k"] == 3 and info["hierarchical"]
    assert info["source_domains"] == ["code", "cooking", "legal"]
    assert info["embedder"]["name"] == "tfidf" and info["embedder"]["dim"] == 16
    assert np.load(clustered / info["centroids"]["fine"]).shape == (6, 16)
    assert np.load(clustered / info["centroids"]["coarse"]).shape == (3, 16)
    for d in out.domains:
        for s in SPLITS:
            ds = out.split(d, s)
            assert ds.n_docs >= 1  # min_tokens=1: every cluster has every split
            assert all(ds.document(j)[-1] == out.eos_id for j in range(ds.n_docs))


def test_hierarchy_is_consistent(clustered):
    data = DataDir.open(clustered)
    info = data.manifest.extra["clusters"]
    parents = np.asarray(info["parents"])
    assert parents.tolist() == sorted(parents.tolist())
    assert set(parents.tolist()) == {0, 1, 2}
    assert data.domains == cluster_names(parents, hierarchical=True)
    assert all(name.startswith(f"c{p:02d}_") for name, p in zip(data.domains, parents))
    # Coarse clusters are ordered by train tokens, and fine ones within each coarse cluster.
    tokens = np.array([data.split(d, "train").n_tokens for d in data.domains])
    coarse_tokens = np.bincount(parents, weights=tokens)
    assert coarse_tokens.tolist() == sorted(coarse_tokens.tolist(), reverse=True)
    for j in range(3):
        t = tokens[parents == j]
        assert t.tolist() == sorted(t.tolist(), reverse=True)
    # Each training document's fine cluster hangs under its nearest coarse centroid.
    c = Clustering.load(data)
    tok = data.tokenizer()
    for idx, d in enumerate(data.domains):
        ds = data.split(d, "train")
        x = c.embedder.embed([decode(tok, ds.document(j)) for j in range(ds.n_docs)])
        near = np.argmin(((x[:, None, :] - c.hierarchy.coarse[None]) ** 2).sum(-1), axis=1)
        assert (near == parents[idx]).all()


def test_every_document_lands_in_one_cluster_and_tokens_are_conserved(prepared, clustered):
    src, out = DataDir.open(prepared), DataDir.open(clustered)
    info = out.manifest.extra["clusters"]
    for s in SPLITS:
        table = _units(out, s)
        assert table.shape[1] == 5
        # Rows grouped by cluster; row j of a cluster is its document j, a piece of the source.
        seen: dict[tuple[int, int], list[tuple[int, int]]] = {}
        row = 0
        for c, name in enumerate(out.domains):
            ds = out.split(name, s)
            for j in range(ds.n_docs):
                dom, doc, start, end, lab = table[row].tolist()
                assert lab == c
                source = src.split(src.domains[dom], s).document(doc)
                piece = source[start:end]
                if end < source.size:
                    piece = np.append(piece, src.eos_id)
                np.testing.assert_array_equal(ds.document(j), piece)
                seen.setdefault((dom, doc), []).append((start, end))
                row += 1
        assert row == table.shape[0]
        # The pieces of every source document of this split tile it exactly, once.
        n_docs = sum(src.split(d, s).n_docs for d in src.domains)
        assert len(seen) == n_docs
        for (dom, doc), spans in seen.items():
            spans.sort()
            length = src.split(src.domains[dom], s).document(doc).size
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        tokens_in = sum(src.split(d, s).n_tokens for d in src.domains)
        tokens_out = sum(out.split(d, s).n_tokens for d in out.domains)
        assert tokens_out == tokens_in + info["inserted_eos"][s]
        assert info["inserted_eos"][s] == table.shape[0] - n_docs
        comp = np.asarray(info["composition"][s]["tokens"])
        assert comp.sum() == tokens_out
        assert comp.sum(1).tolist() == [out.split(d, s).n_tokens for d in out.domains]


def test_whole_documents_are_copied_exactly(prepared, tmp_path):
    src = DataDir.open(prepared)
    out = cluster(_cfg(prepared, tmp_path / "w", chunk_tokens=0, coarse=0, k=4))
    assert out.domains == ["c000", "c001", "c002", "c003"]
    assert out.manifest.extra["clusters"]["parents"] == [0, 0, 0, 0]
    for s in SPLITS:
        assert out.manifest.extra["clusters"]["inserted_eos"][s] == 0
        before = sorted(
            src.split(d, s).document(j).tobytes()
            for d in src.domains
            for j in range(src.split(d, s).n_docs)
        )
        after = sorted(
            out.split(d, s).document(j).tobytes()
            for d in out.domains
            for j in range(out.split(d, s).n_docs)
        )
        assert before == after


def test_clustering_is_deterministic_for_a_seed(prepared, clustered, tmp_path):
    # No cache this time: the result must not depend on where embeddings came from.
    again = cluster(_cfg(prepared, tmp_path / "again", cache=False)).root
    a = json.loads((clustered / "manifest.json").read_text())
    b = json.loads((again / "manifest.json").read_text())
    assert a["extra"]["clusters"] == b["extra"]["clusters"]
    assert [d["name"] for d in a["domains"]] == [d["name"] for d in b["domains"]]
    for f in sorted(p.relative_to(clustered) for p in clustered.rglob("*") if p.is_file()):
        if f.name != "manifest.json":
            assert (again / f).read_bytes() == (clustered / f).read_bytes(), f


def test_held_out_documents_go_to_their_domains_clusters(prepared, clustered):
    data = DataDir.open(clustered)
    info = data.manifest.extra["clusters"]
    majority = [
        info["source_domains"][i]
        for i in np.argmax(np.asarray(info["composition"]["train"]["tokens"]), axis=1)
    ]
    assert purity(np.asarray(info["composition"]["train"]["tokens"])) > 0.95
    assert info["purity"] == pytest.approx(
        purity(np.asarray(info["composition"]["train"]["tokens"]))
    )
    texts, domains = _source_texts(prepared, "test")
    labels = assign(clustered, texts)
    assert labels.shape == (len(texts),) and labels.dtype == np.int64
    hits = np.mean([majority[c] == d for c, d in zip(labels.tolist(), domains)])
    assert hits >= 0.9
    for d in ("code", "cooking", "legal"):
        mine = [t for t, dd in zip(texts, domains) if dd == d]
        hist = cluster_histogram(clustered, mine)
        assert hist.shape == (6,) and hist.sum() == pytest.approx(1.0) and (hist >= 0).all()
        assert hist[[m == d for m in majority]].sum() >= 0.9
        docs = cluster_histogram(clustered, mine, weight="docs")
        assert docs.sum() == pytest.approx(1.0)


def test_assign_puts_a_clustered_document_back_in_its_cluster(clustered):
    data = DataDir.open(clustered)
    c = Clustering.load(clustered)
    tok = data.tokenizer()
    for idx, d in enumerate(data.domains):
        ds = data.split(d, "val")
        texts = [decode(tok, ds.document(j)) for j in range(ds.n_docs)]
        assert (c.assign(texts) == idx).all()


def test_merging_keeps_every_cluster_usable(prepared, tmp_path):
    out = cluster(_cfg(prepared, tmp_path / "m", k=12, coarse=0, min_tokens=400))
    info = out.manifest.extra["clusters"]
    assert info["requested"] == {"k": 12, "coarse": 0}
    assert info["k"] == len(out.domains) == 12 - len(info["merged"])
    assert len(info["merged"]) >= 1
    assert all("fewer than 400 tokens in" in m["reason"] for m in info["merged"])
    for d in out.domains:
        for s in SPLITS:
            assert out.split(d, s).n_tokens >= 400
    # Merging moves units, never loses them.
    src = DataDir.open(prepared)
    for s in SPLITS:
        assert sum(out.split(d, s).n_tokens for d in out.domains) == (
            sum(src.split(d, s).n_tokens for d in src.domains) + info["inserted_eos"][s]
        )
    with pytest.raises(
        DataError, match="fewer than 2 clusters are left; lower --k or --min-tokens"
    ):
        cluster(_cfg(prepared, tmp_path / "m2", k=4, coarse=0, min_tokens=10**6))


def test_bad_inputs_give_clear_errors(prepared, tmp_path):
    with pytest.raises(ConfigError, match="k must be at least 2 clusters, got 1"):
        _cfg(prepared, tmp_path / "x", k=1, coarse=0)
    with pytest.raises(ConfigError, match=r"coarse \(8\) cannot exceed k \(6\)"):
        _cfg(prepared, tmp_path / "x", coarse=8)
    with pytest.raises(ConfigError, match="coarse must be 0 .* or at least 2"):
        _cfg(prepared, tmp_path / "x", coarse=1)
    with pytest.raises(ConfigError, match="unknown embedder 'bert'; choose one of: minilm, tfidf"):
        _cfg(prepared, tmp_path / "x", embedder="bert")
    with pytest.raises(ConfigError, match="chunk_tokens must be 0"):
        _cfg(prepared, tmp_path / "x", chunk_tokens=3)
    with pytest.raises(DataError, match="is not a prepared data dir"):
        cluster(_cfg(tmp_path / "missing", tmp_path / "x"))
    with pytest.raises(
        DataError, match=r"k = 5000 clusters need at least 5000 training documents; .* has \d+"
    ):
        cluster(_cfg(prepared, tmp_path / "x", k=5000, coarse=0))
    with pytest.raises(DataError, match="is the input data dir"):
        cluster(_cfg(prepared, prepared))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a mixlab data dir"):
        cluster(_cfg(prepared, tmp_path / "taken"))
    with pytest.raises(DataError, match="is not a clustered data dir"):
        assign(prepared, ["some text"])
    with pytest.raises(DataError, match="target set is empty"):
        Clustering.load(_fresh_cluster(prepared, tmp_path)).histogram([])
    with pytest.raises(DataError, match="text 1 to assign is empty"):
        assign(_fresh_cluster(prepared, tmp_path), ["fine", "  "])
    assert all(issubclass(e, MixlabError) for e in (ConfigError, DataError))


def _fresh_cluster(prepared: Path, tmp_path: Path) -> Path:
    return cluster(_cfg(prepared, tmp_path / "fresh", k=3, coarse=0)).root


def test_rerun_is_a_no_op_and_cli_prints_a_summary(prepared, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "cluster",
        "--data",
        str(prepared),
        "--out",
        str(out),
        "--k",
        "4",
        "--coarse",
        "2",
        "--embedder",
        "tfidf",
        "--embedder-opt",
        "dim=8",
        "--chunk-tokens",
        "200",
        "--min-tokens",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "majority source" in printed.out and "purity" in printed.out
    assert "embedding (tfidf)" in printed.err or "embedded" in printed.err
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "is up to date" in capsys.readouterr().err
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    data = DataDir.open(out)
    assert data.domains == ["c00_00", "c00_01", "c01_00", "c01_01"]
    assert data.manifest.command.startswith("mixlab cluster --data")
    assert main(["cluster", "--data", str(prepared), "--out", str(out), "--k", "1"]) == 2
    assert "k must be at least 2 clusters" in capsys.readouterr().err
    assert (
        main(["cluster", "--data", str(prepared), "--out", str(out), "--embedder-opt", "dims=3"])
        == 2
    )
    assert "Did you mean 'dim'" in capsys.readouterr().err


def test_synthetic_multi_shard_data_dir_clusters_by_domain(tmp_path):
    from mixlab.data.synthetic import make_synthetic_datadir

    src = DataDir.open(
        make_synthetic_datadir(tmp_path / "in", {"a": 40, "b": 40, "c": 10}, shard_tokens=300)
    )
    assert len(src.manifest.domain("a").splits["train"].shards) > 1
    out = cluster(
        ClusterConfig(
            data=str(src.root),
            out=str(tmp_path / "s"),
            k=3,
            embedder_options={"dim": 8},
            chunk_tokens=0,
            min_tokens=1,
            cache=False,
        )
    )
    comp = np.asarray(out.manifest.extra["clusters"]["composition"]["train"]["docs"])
    # Three patterned domains with disjoint token bands (word-level tokens): pure clusters.
    assert sorted(comp.max(axis=1).tolist()) == [10, 40, 40]
    assert purity(comp) == 1.0
    for s in SPLITS:
        before = sorted(
            src.split(d, s).document(j).tobytes()
            for d in src.domains
            for j in range(src.split(d, s).n_docs)
        )
        after = sorted(
            out.split(d, s).document(j).tobytes()
            for d in out.domains
            for j in range(out.split(d, s).n_docs)
        )
        assert before == after


def test_pieces_and_units():
    assert piece_bounds(10, 4).tolist() == [0, 3, 6, 10]
    assert piece_bounds(8, 4).tolist() == [0, 4, 8] and piece_bounds(5, 0).tolist() == [0, 5]
    u = build_units([np.array([11, 3]), np.array([1])], chunk_tokens=4)
    # Document 0 has 10 tokens + EOS -> pieces [0,3) [3,6) [6,11); then [0,3); then [0,1).
    assert u.domain.tolist() == [0, 0, 0, 0, 1]
    assert u.doc.tolist() == [0, 0, 0, 1, 0]
    assert u.start.tolist() == [0, 3, 6, 0, 0] and u.end.tolist() == [3, 6, 11, 3, 1]
    assert u.tokens.tolist() == [4, 4, 5, 3, 1]
