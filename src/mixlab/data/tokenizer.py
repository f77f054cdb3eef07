"""Tokenizers: train a byte-level BPE on a domain-balanced sample, or use a given one.

A given tokenizer (``--tokenizer SPEC``, ``resolve_tokenizer``) is one of:

- a ``tokenizer.json`` file (``tokenizers`` format; no ``transformers`` needed);
- a local model directory: anything ``transformers.AutoTokenizer.from_pretrained`` loads from
  it offline (a ``tokenizer.json``, or slow-tokenizer files it converts);
- a model name in the local Hugging Face cache (``HF_HUB_CACHE``), loaded with
  ``local_files_only=True``: nothing is ever downloaded.

Whatever the source, mixlab encodes with the ``tokenizers.Tokenizer`` that ``transformers``
itself uses (``backend_tokenizer``), with truncation and padding switched off (a
``tokenizer.json`` saved with a ``max_length`` would otherwise cut every document short), and
``write_tokenizer`` saves it with ``tokenizer_config.json`` and ``special_tokens_map.json``
beside it, so ``AutoTokenizer.from_pretrained(DATA_DIR)`` loads the data dir's tokenizer.

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
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mixlab.errors import DataError

EOS_TOKEN = "<|endoftext|>"
BYTE_ALPHABET = 256
MIN_VOCAB = BYTE_ALPHABET + 1
"""Every byte plus the EOS token."""
MAX_IDS = 2**32
"""Ids a data dir can hold (uint32 shards; uint16 when the vocabulary has at most 2**16)."""


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


TokenizerKind = Literal["file", "directory", "cached"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"

HF_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip
"""The named special tokens of a ``transformers`` tokenizer that a data dir records."""


@dataclass(frozen=True)
class ResolvedTokenizer:
    """A given tokenizer, loaded (see the module docstring for what ``spec`` may be)."""

    spec: str
    """As the user gave it (recorded as the tokenizer's name)."""
    kind: TokenizerKind
    tokenizer: Any
    """The ``tokenizers.Tokenizer`` to encode with (truncation and padding off)."""
    json_text: str
    """Its ``tokenizer.json`` text as a data dir stores it."""
    copy_from: Path | None
    """A ``tokenizer.json`` file to copy byte for byte instead of writing ``json_text`` (so the
    manifest's hash is the hash of the user's file); None when the text had to be made."""
    special_tokens: dict[str, str]
    """Named special tokens of the ``transformers`` tokenizer (``bos_token``, ``eos_token``,
    ...); empty for a bare ``tokenizer.json``, which does not name them."""
    chat_template: str | None = None
    clean_up_tokenization_spaces: bool = False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` names a file or folder rather than a model in the Hugging Face cache."""
    p = Path(spec)
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith(".json")
        or spec.count("/") > 1  # hub names are NAME or ORG/NAME
        or (p.parent != Path(".") and p.parent.is_dir())  # a missing entry of a local folder
    )


def _from_json(text: str, where: str) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exceptions with its own message
        raise DataError(f"'{where}' is not a Hugging Face tokenizer.json file ({exc}).") from None
    # A tokenizer.json may be saved with truncation (max_length) or padding: either would
    # change the ids of whole documents, so they are switched off.
    tok.no_truncation()
    tok.no_padding()
    return tok


def _auto_tokenizer(spec: str, kind: TokenizerKind) -> ResolvedTokenizer:
    """A model directory or cached model name, through ``transformers.AutoTokenizer``."""
    where = f"tokenizer '{spec}'"
    try:
        import transformers
    except ImportError:
        raise DataError(
            f"{where} is a model {'directory' if kind == 'directory' else 'name'}, which needs "
            "Hugging Face transformers to load: pip install 'mixlab[hf]' (or give its "
            "tokenizer.json)."
        ) from None
    try:
        hf = transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as exc:  # OSError, ValueError, ImportError, ...: all mean "cannot load"
        if kind == "cached":
            raise DataError(
                f"{where} is not a tokenizer.json file, a model directory or a model in the "
                f"local Hugging Face cache (nothing is downloaded; fetch it first, e.g. "
                f"`hf download {spec}`, or give a local directory): {_one_line(exc)}"
            ) from None
        raise DataError(
            f"cannot load {where} with transformers.AutoTokenizer: {_one_line(exc)}"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"{where} loads only as a slow (pure-Python) tokenizer ({type(hf).__name__}); "
            "mixlab needs a fast one: save it with a tokenizer.json (install sentencepiece "
            "and protobuf so transformers can convert it)."
        )
    # special_tokens_map holds the tokens that are set (reading an unset one, hf.pad_token,
    # logs an error in transformers 4); values are str (or AddedToken in old releases).
    given = getattr(hf, "special_tokens_map", {}) or {}
    special = {k: str(given[k]) for k in HF_SPECIAL_TOKENS if given.get(k) is not None}
    template = getattr(hf, "chat_template", None)
    json_text = _from_json(backend.to_str(), spec).to_str(pretty=True)
    return ResolvedTokenizer(
        spec=spec,
        kind=kind,
        tokenizer=_from_json(json_text, spec),
        json_text=json_text,
        copy_from=None,
        special_tokens=special,
        chat_template=template if isinstance(template, str) else None,
        clean_up_tokenization_spaces=bool(getattr(hf, "clean_up_tokenization_spaces", False)),
    )


_RESOLVED: dict[tuple[str, Any], ResolvedTokenizer] = {}


def _stamp(p: Path) -> Any:
    """What changes when the tokenizer at ``p`` may have changed: sizes and times of its
    files; for a cached model name, the cache's location (a snapshot does not change)."""
    if p.is_file():
        st = p.stat()
        return (st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return tuple(
            (c.name, c.stat().st_size, c.stat().st_mtime_ns) for c in sorted(p.iterdir())
            if c.is_file()
        )  # fmt: skip
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return ("hub", str(constants.HF_HUB_CACHE))


def resolve_tokenizer(spec: str | Path) -> ResolvedTokenizer:
    """Load the tokenizer ``spec`` names: a ``tokenizer.json`` file, a local model directory, or
    a model name in the local Hugging Face cache (never downloaded). ``DataError`` (one line)
    when it is none of them or cannot be loaded.

    The last result is kept (``prepare`` asks for the same tokenizer several times) until a
    file of ``spec`` changes."""
    key = (str(spec), _stamp(Path(str(spec)).expanduser()))
    if key not in _RESOLVED:
        res = _resolve(str(spec))
        _RESOLVED.clear()  # one tokenizer at a time: a large one holds ~100 MB
        _RESOLVED[key] = res
    return _RESOLVED[key]


def _resolve(text: str) -> ResolvedTokenizer:
    p = Path(text).expanduser()
    if p.is_file():
        try:
            raw = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read tokenizer file '{p}': {_one_line(exc)}") from None
        tok = _from_json(raw, str(p))
        try:
            spec_json = json.loads(raw)
        except json.JSONDecodeError:  # tokenizers parsed it, so this does not happen
            spec_json = {}
        # Copied byte for byte unless it carried truncation or padding, which are dropped.
        clean = spec_json.get("truncation") is None and spec_json.get("padding") is None
        return ResolvedTokenizer(
            spec=text,
            kind="file",
            tokenizer=tok,
            json_text=raw if clean else tok.to_str(pretty=True),
            copy_from=p if clean else None,
            special_tokens={},
        )
    if p.is_dir():
        return _auto_tokenizer(str(p), "directory")
    if not text or _looks_like_path(text):
        noun = "file" if text.endswith(".json") else "file or model directory"
        raise DataError(f"tokenizer {noun} '{p}' does not exist.")
    return _auto_tokenizer(text, "cached")


def load_tokenizer(path: str | Path, eos_token: str = EOS_TOKEN) -> Any:
    """The ``tokenizers.Tokenizer`` of ``path`` (any ``resolve_tokenizer`` spec), checked to
    have ``eos_token``; truncation and padding are off."""
    res = resolve_tokenizer(path)
    n = vocab_size(res.tokenizer)
    if n > MAX_IDS:
        # Checked here, before any text is read: shards hold uint16 or uint32 ids.
        raise DataError(
            f"tokenizer '{path}' has ids up to {n - 1:,}, more than uint32 shards hold "
            f"({MAX_IDS:,} ids); use a tokenizer with fewer ids."
        )
    if res.tokenizer.token_to_id(eos_token) is None:
        own = res.special_tokens.get("eos_token")
        hint = f" ({own!r} for this one)" if own else ""
        raise DataError(
            f"tokenizer '{path}' has no token {eos_token!r} to end documents with; set "
            f"--eos-token to its end-of-text token{hint}."
        )
    return res.tokenizer


def default_eos_token(spec: str | Path) -> str:
    """The token that should end documents for tokenizer ``spec``: a model tokenizer's own
    ``eos_token`` when it has one, else ``EOS_TOKEN``."""
    if not spec:
        return EOS_TOKEN
    return resolve_tokenizer(spec).special_tokens.get("eos_token", EOS_TOKEN)


def tokenizer_fingerprint(spec: str | Path) -> str:
    """What identifies tokenizer ``spec`` for ``prepare``'s inputs hash: the sha256 of a
    ``tokenizer.json`` file (as before model directories were accepted), or for a directory or
    cached name the sha256 of the tokenizer it resolves to and of its special tokens."""
    p = Path(spec).expanduser()
    if p.is_file():
        return sha256_file(p)
    res = resolve_tokenizer(spec)
    blob = json.dumps(
        {"tokenizer": res.json_text, "special": res.special_tokens, "chat": res.chat_template},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def hf_tokenizer_files(
    eos_token: str,
    special_tokens: Mapping[str, str] | None = None,
    model_max_length: int | None = None,
    chat_template: str | None = None,
    clean_up_tokenization_spaces: bool = False,
) -> dict[str, dict[str, Any]]:
    """``{file name: JSON}`` of ``tokenizer_config.json`` and ``special_tokens_map.json`` for a
    folder holding a ``tokenizer.json``, so that ``AutoTokenizer.from_pretrained`` loads it.

    ``tokenizer_class`` is ``PreTrainedTokenizerFast``, which every ``transformers`` from 4.x
    on builds from ``tokenizer.json`` alone (model-specific classes may need vocabulary files
    mixlab does not write). ``eos_token`` (the token that ends documents in the data) overrides
    the ``eos_token`` of ``special_tokens``; ``clean_up_tokenization_spaces`` is off by default
    so that decoding a byte-level BPE gives the text back exactly.
    """
    special = {k: v for k, v in (special_tokens or {}).items() if k in HF_SPECIAL_TOKENS}
    special["eos_token"] = eos_token
    special = {k: special[k] for k in HF_SPECIAL_TOKENS if k in special}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {TOKENIZER_CONFIG: config, SPECIAL_TOKENS_MAP: special}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(
    out_dir: str | Path,
    source: str | Path | ResolvedTokenizer | Any,
    eos_token: str,
    model_max_length: int | None = None,
) -> dict[str, Any]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``out_dir`` (an existing folder, typically the temporary one of an atomic write) and
    return the record a manifest keeps of them.

    ``source``: a ``resolve_tokenizer`` spec or its result, or a ``tokenizers.Tokenizer`` (one
    that mixlab trained). The record is ``{"name", "kind", "sha256", "special_tokens"}``:
    the spec as given (``"trained"`` for a Tokenizer object), its kind (``file``,
    ``directory``, ``cached``, ``trained``), the sha256 of the ``tokenizer.json`` written and
    the special tokens of ``special_tokens_map.json``.
    """
    out = Path(out_dir)
    target = out / TOKENIZER_JSON
    if isinstance(source, (str, Path)):
        source = resolve_tokenizer(source)
    if isinstance(source, ResolvedTokenizer):
        res = source
        if res.copy_from is not None:
            shutil.copyfile(res.copy_from, target)
        else:
            target.write_text(res.json_text, encoding="utf-8")
        name, kind = res.spec, res.kind
        files = hf_tokenizer_files(
            eos_token,
            res.special_tokens,
            model_max_length,
            res.chat_template,
            res.clean_up_tokenization_spaces,
        )
    else:
        source.save(str(target))
        name, kind = "trained", "trained"
        files = hf_tokenizer_files(eos_token, None, model_max_length)
    for file_name, data in files.items():
        _write_json(out / file_name, data)
    return {
        "name": name,
        "kind": kind,
        "sha256": sha256_file(target),
        "special_tokens": files[SPECIAL_TOKENS_MAP],
    }


def eos_id(tok: Any, eos_token: str = EOS_TOKEN) -> int:
    tid = tok.token_to_id(eos_token)
    if tid is None:
        raise DataError(f"tokenizer has no token {eos_token!r}.")
    return int(tid)


def vocab_size(tok: Any) -> int:
    """Number of ids the tokenizer can emit (added tokens included): one more than its largest
    id. A vocabulary with gaps (ids past its token count) gets room for its largest id, so
    that every id fits the shard dtype chosen from this size (``dtype_for_vocab``) and the
    embedding; the ids of the gaps are never produced."""
    n = int(tok.get_vocab_size(with_added_tokens=True))
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    return max(n, int(top) + 1)


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
