"""Small synthetic data dirs for tests and benchmarks (random or patterned token documents).

These are written through the real shard writer, so everything that reads a data dir reads
them exactly as it reads a prepared corpus.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mixlab.data.format import (
    MANIFEST,
    SPLITS,
    TOKENIZER,
    DomainInfo,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    write_json_atomic,
)


def word_level_tokenizer_json(vocab_size: int) -> str:
    """A valid ``tokenizers`` WordLevel tokenizer whose token i is the word 'w{i}' (0 = EOS)."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": 0,
                    "content": "<|endoftext|>",
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            ],
            "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": None,
            "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"},
        }
    )


def make_synthetic_datadir(
    root: str | Path,
    domains: dict[str, int],
    vocab_size: int = 64,
    doc_len: int = 50,
    split_docs: dict[str, int] | None = None,
    seed: int = 0,
    shard_tokens: int = 0,
    patterned: bool = True,
    shuffled_copies: dict[str, str] | None = None,
) -> Path:
    """Write a data dir with ``domains[name]`` train documents per domain.

    Patterned domains are learnable: domain k emits tokens from its own band of the vocabulary
    with a simple successor rule plus noise, so a small model can tell domains apart.
    ``split_docs`` gives val/test document counts (default 8 each). ``shuffled_copies`` maps a
    domain to another one whose kind of document it holds with the tokens of each document
    shuffled (corrupted text: the same tokens, no order), e.g. ``{"noisy": "clean"}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = dtype_for_vocab(vocab_size)
    split_docs = {"val": 8, "test": 8, **(split_docs or {})}
    infos = []
    m = len(domains)
    band = max(2, (vocab_size - 1) // max(1, m))
    names = list(domains)
    copies = shuffled_copies or {}
    for name, like in copies.items():
        if name not in domains or like not in domains or like in copies:
            raise ValueError(f"shuffled_copies: {name!r} -> {like!r} must map a domain to an uncorrupted one.")
    for name, n_train in domains.items():
        k = names.index(copies.get(name, name))
        splits = {}
        for split in SPLITS:
            n_docs = n_train if split == "train" else split_docs[split]
            w = ShardWriter(root, name, split, dtype, max_tokens=shard_tokens)
            for _ in range(n_docs):
                if patterned:
                    start = 1 + k * band
                    x = rng.integers(0, band, size=doc_len - 1)
                    seq = np.empty(doc_len - 1, dtype=np.int64)
                    seq[0] = x[0]
                    for t in range(1, doc_len - 1):
                        seq[t] = (seq[t - 1] + 1 + k) % band if rng.random() < 0.8 else x[t]
                    if name in copies:
                        seq = rng.permutation(seq)
                    ids = np.append(start + seq, 0)
                else:
                    ids = np.append(rng.integers(1, vocab_size, size=doc_len - 1), 0)
                w.add(ids)
            splits[split] = w.close()
        infos.append(DomainInfo(name=name, splits=splits, source="synthetic"))
    tok = word_level_tokenizer_json(vocab_size)
    (root / TOKENIZER).write_text(tok, encoding="utf-8")
    manifest = Manifest(
        domains=infos,
        vocab_size=vocab_size,
        eos_id=0,
        dtype=dtype.name,
        tokenizer_sha256=hashlib.sha256(tok.encode()).hexdigest(),
        created_by="mixlab synthetic",
        source="synthetic",
        seed=seed,
    )
    write_json_atomic(root / MANIFEST, manifest.to_json())
    return root


def add_random_domains(
    root: str | Path,
    domains: dict[str, int],
    doc_len: int = 50,
    split_docs: dict[str, int] | None = None,
    seed: int = 1,
) -> Path:
    """Append unlearnable domains to the data dir at ``root`` (one written by
    ``make_synthetic_datadir``): ``domains[name]`` train documents of i.i.d. uniform tokens.

    Every token but the closing EOS is drawn uniformly from 1..vocab_size-1, independently of
    everything before it, so no model can predict it better than uniform: the per-token loss on
    such a domain is at least ln(vocab_size - 1) in expectation (the EOS, one token in
    ``doc_len``, is the only predictable one). ``split_docs`` gives val/test document counts
    (default 8 each). The new domains come after the existing ones in the manifest.
    """
    root = Path(root)
    path = root / MANIFEST
    manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    clash = sorted(set(domains) & set(manifest.domain_names))
    if clash:
        raise ValueError(f"add_random_domains: domain(s) {clash} already exist in {root}.")
    rng = np.random.default_rng(seed)
    dtype = np.dtype(manifest.dtype)
    split_docs = {"val": 8, "test": 8, **(split_docs or {})}
    for name, n_train in domains.items():
        splits = {}
        for split in SPLITS:
            w = ShardWriter(root, name, split, dtype)
            for _ in range(n_train if split == "train" else split_docs[split]):
                w.add(np.append(rng.integers(1, manifest.vocab_size, size=doc_len - 1), 0))
            splits[split] = w.close()
        manifest.domains.append(DomainInfo(name=name, splits=splits, source="synthetic-random"))
    write_json_atomic(path, manifest.to_json())
    return root
