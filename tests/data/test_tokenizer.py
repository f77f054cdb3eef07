"""Byte-level BPE: exact round trip, EOS handling, balanced sample, loading."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mixlab.data import tokenizer as bpe
from mixlab.errors import DataError

CORPUS = [
    "def f(x):\n    return x * 2\n",
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "数据混合 与 训练",
] * 20


@pytest.fixture(scope="module")
def tok():
    return bpe.train_bpe(CORPUS, vocab_size=300)


def test_trained_vocab_and_eos(tok):
    assert bpe.eos_id(tok) == 0
    assert bpe.MIN_VOCAB <= bpe.vocab_size(tok) <= 300


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading spaces,\ttabs\t\tand\n\nblank lines\n",
        "unseen: Ωmega ☃ 😀 \u200b zero-width",
        "a literal <|endoftext|> inside a document",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    (ids,) = bpe.encode_documents(tok, [text], eos=0)
    assert ids.dtype == np.int64
    assert ids[-1] == 0
    # EOS only ends documents: the literal string is encoded as bytes.
    assert 0 not in ids[:-1].tolist()
    assert bpe.decode(tok, ids) == text


def test_encode_documents_batches_keep_order(tok):
    texts = ["one", "two two", "three three three"]
    batch = bpe.encode_documents(tok, texts, eos=0)
    single = [bpe.encode_documents(tok, [t], eos=0)[0] for t in texts]
    assert [b.tolist() for b in batch] == [s.tolist() for s in single]
    assert [bpe.decode(tok, b) for b in batch] == texts


def test_training_is_deterministic():
    a = bpe.train_bpe(CORPUS, vocab_size=280).to_str()
    b = bpe.train_bpe(CORPUS, vocab_size=280).to_str()
    assert a == b


def test_vocab_too_small():
    with pytest.raises(DataError, match="at least 257 ids"):
        bpe.train_bpe(CORPUS, vocab_size=256)


def test_balanced_sample_takes_equal_bytes_per_domain():
    streams = {
        "a": iter(["aaaa", "aaaa", "aaaa"]),
        "b": iter(["é" * 10]),  # 20 bytes: cut on a character boundary
        "c": iter(["cc"]),  # smaller than its share: gives all it has
    }
    assert list(bpe.balanced_sample(streams, bytes_per_domain=7)) == ["aaaa", "aaa", "ééé", "cc"]


def test_load_tokenizer(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = bpe.load_tokenizer(path)
    text = "The lazy dog."
    assert bpe.encode_documents(loaded, [text], 0)[0].tolist() == (
        bpe.encode_documents(tok, [text], 0)[0].tolist()
    )
    with pytest.raises(DataError, match="does not exist"):
        bpe.load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"is not a Hugging Face tokenizer\.json"):
        bpe.load_tokenizer(bad)
    with pytest.raises(DataError, match="has no token '</s>'"):
        bpe.load_tokenizer(path, eos_token="</s>")
    assert bpe.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.read_text())["added_tokens"][0]["content"] == bpe.EOS_TOKEN
