"""Byte-level BPE: train one on a domain-balanced sample, or load a given ``tokenizer.json``.

A byte-level BPE (GPT-2 style: no normaliser, byte-to-unicode pre-tokenizer, no prefix space)
maps every string to ids and back exactly, so ``decode(encode(text)) == text`` for any text.
The one special token (``EOS_TOKEN`` unless told otherwise) ends every document; it is never
produced from document text: a literal ``<|endoftext|>`` inside a document is encoded as bytes.

Long documents can be encoded in pieces with exactly the ids of the whole (``cuts_exactly`` says
when, ``cut_point`` finds where), so that encoding memory does not grow with document size.
"""

from __future__ import annotations

import hashlib
import json
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


def encode_text(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` (no EOS), on the calling thread.

    ``Tokenizer.encode`` of one text never uses the Rust thread pool, so a worker process that
    calls it uses one core; special tokens inside the text are encoded as ordinary text.
    """
    tok.encode_special_tokens = True
    return tok.encode(text, add_special_tokens=False).ids


# --- exact encoding in pieces ---------------------------------------------------------------
#
# A GPT-2 style byte-level BPE (no normaliser, ByteLevel pre-tokenizer with the GPT-2 regex and
# no prefix space, BPE without dropout, no added token but special ones) encodes each piece
# that its regex cuts the text into on its own. So cutting a text where the regex always cuts,
# whatever comes before or after, leaves the ids unchanged. One such place: a single space, tab
# or newline between two non-whitespace characters. Proof, for text s cut at p (s[p-1] and
# s[p+1] not whitespace, s[p] in " \t\n"): the regex alternatives
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# that can match a non-whitespace character cannot extend over a following whitespace one, so
# the match holding s[p-1] ends at p, in s and in s[:p] alike (matches before it only look one
# character past their end). From p, a space followed by s[p+1] is matched by the one
# ` ?` alternative that fits s[p+1]; a tab or newline followed by non-whitespace is matched
# alone by `\s+`: both depend on s[p:p+2] only, and the pattern has no look-behind, so s[p:]
# is cut as s is from p on. Python's str.isspace() holds for every character the Rust regex
# calls whitespace (and a few control characters more), so "not isspace()" is safe.

_CUT_BYTES = (b" ", b"\n", b"\t")


def cuts_exactly(tok: Any) -> bool:
    """True when encoding a text cut at ``cut_point`` gives exactly the ids of the whole text.

    Holds for the byte-level BPE that ``train_bpe`` makes and for GPT-2 style tokenizers;
    anything else (a normaliser, another pre-tokenizer, a prefix space, BPE dropout, non-special
    added tokens) is encoded whole.
    """
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("add_prefix_space") is False
        and pre.get("use_regex", True) is True
        and model.get("type") == "BPE"
        and model.get("dropout") in (None, 0.0)
        and all(t.get("special") for t in spec.get("added_tokens") or [])
    )


def _char_before(data: bytes, p: int) -> str:
    """The character that ends just before byte ``p`` of UTF-8 ``data`` ('' at the start)."""
    i = p - 1
    while i > 0 and p - i < 4 and data[i] & 0xC0 == 0x80:  # continuation bytes
        i -= 1
    if i < 0 or data[i] & 0xC0 == 0x80:  # no complete character inside ``data``
        return ""
    return data[i:p].decode("utf-8", errors="replace")


def _char_at(data: bytes, p: int) -> str:
    """The character that starts at byte ``p`` of UTF-8 ``data`` ('' past the end)."""
    if p >= len(data):
        return ""
    lead = data[p]
    size = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if p + size > len(data):  # cut off by the end of ``data``: unknown
        return ""
    return data[p : p + size].decode("utf-8", errors="replace")


def cut_point(data: bytes, limit: int) -> int | None:
    """The largest byte offset p in [1, limit] where ``data`` may be cut for exact encoding.

    ``data`` is UTF-8 text that goes on after its end (p must leave a character after the
    whitespace inside ``data``). ``data[:p]`` and ``data[p:]`` then encode, with a tokenizer for
    which ``cuts_exactly`` holds, to ids whose concatenation is the ids of the whole. None when
    there is no such place (a text without single spaces between words).
    """
    hi = min(limit, len(data) - 2) + 1  # exclusive upper end of candidate positions
    while hi > 1:
        p = max(data.rfind(b, 1, hi) for b in _CUT_BYTES)
        if p < 1:
            return None
        before, after = _char_before(data, p), _char_at(data, p + 1)
        if before and after and not before.isspace() and not after.isspace():
            return p
        hi = p
    return None


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
