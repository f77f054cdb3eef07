"""Byte-level BPE: train one on a domain-balanced sample, or load a given ``tokenizer.json``.

A byte-level BPE (GPT-2 style: no normaliser, byte-to-unicode pre-tokenizer, no prefix space)
maps every string to ids and back exactly, so ``decode(encode(text)) == text`` for any text.
The one special token (``EOS_TOKEN`` unless told otherwise) ends every document; it is never
produced from document text: a literal ``<|endoftext|>`` inside a document is encoded as bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.errors import DataError

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + 1
"""Every byte plus the EOS token."""


def train_bpe(
    texts: Iterable[str], vocab_size: int, eos_token: str = EOS_TOKEN, min_frequency: int = 2
) -> Any:
    """Train a byte-level BPE on ``texts`` with at most ``vocab_size`` ids (EOS is id 0).

    The vocabulary can end up smaller than asked when the sample has fewer merges to offer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_VOCAB} ids ({BYTE_ALPHABET} bytes + EOS)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path, eos_token: str = EOS_TOKEN) -> Any:
    """Load a ``tokenizers`` JSON file and check it has ``eos_token``."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file '{p}' does not exist.")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises plain Exceptions with its own message
        raise DataError(f"'{p}' is not a Hugging Face tokenizer.json file ({exc}).") from None
    if tok.token_to_id(eos_token) is None:
        raise DataError(
            f"tokenizer '{p}' has no token {eos_token!r} to end documents with; set "
            "--eos-token to its end-of-text token."
        )
    return tok


def eos_id(tok: Any, eos_token: str = EOS_TOKEN) -> int:
    tid = tok.token_to_id(eos_token)
    if tid is None:
        raise DataError(f"tokenizer has no token {eos_token!r}.")
    return int(tid)


def vocab_size(tok: Any) -> int:
    """Number of ids the tokenizer can emit (added tokens included)."""
    return int(tok.get_vocab_size(with_added_tokens=True))


def encode_documents(tok: Any, texts: Sequence[str], eos: int) -> list[np.ndarray]:
    """Token ids of each text followed by ``eos``: a list of int64 arrays [len_i + 1].

    Encodes the whole batch in one call (parallel in Rust unless TOKENIZERS_PARALLELISM=false).
    Special tokens inside the text are encoded as ordinary text, so EOS only ends documents.
    """
    tok.encode_special_tokens = True
    # encode_batch_fast skips the character offsets we do not need (tokenizers >= 0.20).
    fast = getattr(tok, "encode_batch_fast", None)
    encodings = (fast or tok.encode_batch)(list(texts), add_special_tokens=False)
    out = []
    for enc in encodings:
        ids = np.empty(len(enc.ids) + 1, dtype=np.int64)
        ids[:-1] = enc.ids
        ids[-1] = eos
        out.append(ids)
    return out


def decode(tok: Any, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ``ids`` with special tokens (EOS) left out."""
    return str(tok.decode([int(i) for i in ids], skip_special_tokens=True))


def balanced_sample(streams: Mapping[str, Iterable[str]], bytes_per_domain: int) -> Iterator[str]:
    """Texts for tokenizer training: up to ``bytes_per_domain`` UTF-8 bytes from each stream.

    Each domain contributes its texts in the order its stream gives them, the last one cut to
    fit; a domain smaller than its share gives all it has (the rest of the share is not handed
    to other domains, so no domain dominates the merges).
    """
    for stream in streams.values():
        left = bytes_per_domain
        for text in stream:
            if left <= 0:
                break
            data = text.encode("utf-8")
            if len(data) > left:
                # Cut on a character boundary: 'ignore' drops a split multi-byte tail.
                text = data[:left].decode("utf-8", errors="ignore")
                data = data[:left]
            left -= len(data)
            yield text


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
