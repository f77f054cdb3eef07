"""Raw text -> a prepared data dir (tokenizer + per-domain token shards + manifest).

``prepare(cfg)`` runs four stages, all inside a temporary sibling of ``cfg.out`` that replaces
it only when complete (``atomic_dir``), so a failure leaves what was at ``out`` untouched:

1. ingest: stream every document of the source, clean it (``clean_text``), drop empty, short
   and exact-duplicate documents (per domain, by hash), stop a domain at its byte cap, and spool
   the kept UTF-8 text to a scratch file (memory holds only offsets and hashes);
2. split: per domain, a seeded permutation of its documents gives disjoint test/val/train sets
   (before any tokenizer work, so that too small a domain fails fast);
3. tokenizer: train a byte-level BPE on a sample with equal bytes per domain, or load one;
4. encode: documents are tokenized in batches and appended to shards (``ShardWriter``).

Re-running with the same inputs and options is a no-op: ``inputs_hash`` covers the options,
the input files (paths, sizes, mtimes) or package versions, and the tokenizers version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import shutil
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab import __version__
from mixlab.data import tokenizer as bpe
from mixlab.data.builtin import (
    BUILTIN,
    BUILTIN_SOURCES,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    BuiltinSource,
    package_versions,
)
from mixlab.data.format import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    DataDir,
    DomainInfo,
    Manifest,
    ShardWriter,
    SplitInfo,
    atomic_dir,
    dtype_for_vocab,
    write_json_atomic,
)
from mixlab.data.sources import RawDoc, TextSource, check_domain_name, open_source
from mixlab.errors import ConfigError, DataError

PIPELINE_VERSION = 1
"""Bumped whenever cleaning, splitting or encoding changes, so that data dirs are rebuilt."""
_ENCODE_BATCH_BYTES = 1 << 20
_ENCODE_BATCH_DOCS = 512

Log = Callable[[str], None]


@dataclass
class PrepareConfig:
    """Options of ``mixlab prepare`` (each has a CLI flag of the same name, with dashes)."""

    source: str = BUILTIN
    """'builtin', a folder with one sub-folder per domain, or a .jsonl/.parquet file with a domain column."""
    out: str = "data/builtin"
    """The data dir to write (replaced atomically; an existing non-data folder is refused)."""
    vocab_size: int = 8192
    """Ids of the byte-level BPE to train (at least 257); ignored when ``tokenizer`` is given."""
    tokenizer: str = ""
    """Path of a tokenizer.json to use instead of training one; its vocabulary decides the dtype."""
    eos_token: str = bpe.EOS_TOKEN
    """The special token that ends every document."""
    tokenizer_sample_mb: float = 16.0
    """MB (10^6 bytes) of text to train the tokenizer on, split equally between domains."""
    val_fraction: float = 0.05
    """Fraction of each domain's documents held out for validation (rounded to nearest)."""
    test_fraction: float = 0.05
    """Fraction of each domain's documents held out for test (rounded to nearest)."""
    min_split_docs: int = 1
    """At least this many documents in val and in test (when their fraction is > 0); a domain
    needs min_split_docs per held-out split plus one training document, else it is an error."""
    seed: int = 0
    """Seed of the document splits and of the tokenizer sample."""
    text_field: str = "text"
    """Field (.jsonl) or column (.parquet) holding the text."""
    domain_column: str = "domain"
    """Field or column naming the domain, when the source is a single file."""
    min_chars: int = 32
    """Documents shorter than this many characters (after cleaning) are dropped."""
    max_bytes_per_domain: int | None = None
    """Keep at most about this many UTF-8 bytes per domain (the document that crosses the cap is
    kept); 0 = unlimited; unset = 6 MB for the built-in corpus, unlimited otherwise."""
    shard_tokens: int = 0
    """Start a new shard once one reaches this many tokens; 0 = one shard per domain split."""
    domains: list[str] = field(default_factory=list)
    """Prepare only these domains (empty = all); manifest order stays the source's order."""

    def __post_init__(self) -> None:
        if not self.tokenizer:
            if self.vocab_size < bpe.MIN_VOCAB:
                raise ConfigError(
                    f"vocab_size must be at least {bpe.MIN_VOCAB} (256 bytes + EOS), "
                    f"got {self.vocab_size}."
                )
            try:
                dtype_for_vocab(self.vocab_size)
            except DataError as exc:
                raise ConfigError(f"vocab_size: {exc}") from None
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {v}.")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("val_fraction + test_fraction must be below 1.")
        for name in ("min_split_docs", "min_chars", "shard_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.max_bytes_per_domain is not None and self.max_bytes_per_domain < 0:
            raise ConfigError("max_bytes_per_domain must be >= 0 (0 = unlimited).")
        if self.tokenizer_sample_mb <= 0:
            raise ConfigError("tokenizer_sample_mb must be positive.")
        if not self.out:
            raise ConfigError("out must name the data dir to write.")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domains lists a name twice: {self.domains}.")
        for d in self.domains:
            try:
                check_domain_name(d, "domains")
            except DataError as exc:
                raise ConfigError(str(exc)) from None


# --- pure helpers ---------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, int]:
    """Normalise newlines to ``\\n``, drop control characters (tab and newline stay) and byte-order
    marks, strip surrounding whitespace. Lone surrogates (from JSON escapes) cannot be written
    as UTF-8, so they become U+FFFD; returns (text, surrogates replaced).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    n_sur = 0
    if _SURROGATE.search(text):
        text, n_sur = _SURROGATE.subn("\ufffd", text)
    return text.strip(), n_sur


def split_counts(
    n_docs: int,
    val_fraction: float,
    test_fraction: float,
    min_split_docs: int = 1,
    domain: str = "",
) -> tuple[int, int, int]:
    """(train, val, test) document counts; raises ``DataError`` when no training document is left."""

    def held(frac: float) -> int:
        if frac <= 0:
            return 0
        return max(int(n_docs * frac + 0.5), min_split_docs)

    n_val, n_test = held(val_fraction), held(test_fraction)
    n_train = n_docs - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"domain '{domain}' has {n_docs} document(s) after filtering, too few for a val "
            f"split of {n_val} and a test split of {n_test} plus training; add documents, or "
            "lower --val-fraction/--test-fraction or --min-split-docs."
        )
    return n_train, n_val, n_test


def assign_splits(n_docs: int, n_val: int, n_test: int, seed: int, domain: str) -> np.ndarray:
    """[n_docs] int8 split index (into ``SPLITS``: 0 train, 1 val, 2 test) of each document.

    A permutation seeded by (seed, crc32(domain)) puts its first ``n_test`` documents in test,
    the next ``n_val`` in val, the rest in train: disjoint by construction, stable per domain.
    """
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    perm = rng.permutation(n_docs)
    labels = np.zeros(n_docs, dtype=np.int8)
    labels[perm[:n_test]] = SPLITS.index("test")
    labels[perm[n_test : n_test + n_val]] = SPLITS.index("val")
    return labels


def max_bytes(cfg: PrepareConfig) -> int:
    """The byte cap per domain in force (0 = none)."""
    if cfg.max_bytes_per_domain is not None:
        return cfg.max_bytes_per_domain
    return DEFAULT_MAX_BYTES_PER_DOMAIN if cfg.source == BUILTIN else 0


def equivalent_command(cfg: PrepareConfig) -> str:
    """The ``mixlab prepare`` command line that makes the same data dir (defaults left out)."""
    args = ["mixlab", "prepare", "--source", cfg.source, "--out", cfg.out]
    defaults = PrepareConfig()
    for f in dataclasses.fields(cfg):
        if f.name in ("source", "out"):
            continue
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "max_bytes_per_domain":
            args += ["--max-mb-per-domain", f"{value / 1e6:g}"]
        elif f.name == "domains":
            args += ["--domains", ",".join(value)]
        else:
            args += [f"--{f.name.replace('_', '-')}", str(value)]
    return shlex.join(args)


# --- ingest ---------------------------------------------------------------------------------


class _Spool:
    """Cleaned UTF-8 documents of one domain in a scratch file; only offsets stay in memory."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: Any = open(path, "wb")  # noqa: SIM115 (kept open across add() calls)
        self.offsets = array("q", [0])

    def add(self, data: bytes) -> None:
        self._fh.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, order: Iterator[int] | np.ndarray) -> Iterator[str]:
        """Documents in the given order of indices."""
        with open(self.path, "rb") as fh:
            for j in order:
                j = int(j)
                fh.seek(self.offsets[j])
                yield fh.read(self.offsets[j + 1] - self.offsets[j]).decode("utf-8")

    def batches(self) -> Iterator[tuple[int, list[str]]]:
        """(first index, texts) batches in file order, about ``_ENCODE_BATCH_BYTES`` each."""
        start, texts, size = 0, [], 0
        for j, text in enumerate(self.read(iter(range(len(self))))):
            texts.append(text)
            size += self.offsets[j + 1] - self.offsets[j]
            if size >= _ENCODE_BATCH_BYTES or len(texts) >= _ENCODE_BATCH_DOCS:
                yield start, texts
                start, texts, size = j + 1, [], 0
        if texts:
            yield start, texts


@dataclass
class _DomainIngest:
    name: str
    spool: _Spool
    read: int = 0
    empty: int = 0
    short: int = 0
    duplicate: int = 0
    replaced: int = 0
    bytes: int = 0
    capped: bool = False
    seen: set[bytes] = field(default_factory=set)

    @property
    def dropped(self) -> int:
        return self.empty + self.short + self.duplicate


def _ingest(
    source: TextSource, cfg: PrepareConfig, scratch: Path, progress: bool
) -> dict[str, _DomainIngest]:
    from tqdm import tqdm

    cap = max_bytes(cfg)
    wanted = set(cfg.domains)
    states: dict[str, _DomainIngest] = {}

    def wants(domain: str) -> bool:
        if wanted and domain not in wanted:
            return False
        st = states.get(domain)
        return st is None or not st.capped

    bar = tqdm(desc="reading", unit="doc", file=sys.stderr, disable=True if not progress else None)
    try:
        doc: RawDoc
        for doc in source.documents(wants):
            st = states.get(doc.domain)
            if st is None:
                st = states[doc.domain] = _DomainIngest(
                    doc.domain, _Spool(scratch / f"{doc.domain}.txt")
                )
            st.read += 1
            bar.update(1)
            text, surrogates = clean_text(doc.text)
            if not text:
                st.empty += 1
                continue
            if len(text) < cfg.min_chars:
                st.short += 1
                continue
            data = text.encode("utf-8")
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in st.seen:
                st.duplicate += 1
                continue
            st.seen.add(digest)
            st.spool.add(data)
            st.bytes += len(data)
            st.replaced += doc.replaced + surrogates
            if cap and st.bytes >= cap:
                st.capped = True
    finally:
        bar.close()
        for st in states.values():
            st.spool.close()
    return states


def _check_ingest(
    states: dict[str, _DomainIngest], source: TextSource, cfg: PrepareConfig
) -> list[str]:
    """The domains to write, in source order; errors for missing or emptied domains."""
    known = source.domains if source.domains is not None else sorted(states)
    missing = [d for d in cfg.domains if d not in known]
    if missing:
        raise DataError(
            f"domain(s) {', '.join(missing)} not found in {source.label}; it has: "
            f"{', '.join(known) or 'no domain'}."
        )
    names = [d for d in known if (not cfg.domains or d in cfg.domains)]
    if not names:
        raise DataError(f"source {source.label} holds no document.")
    for d in names:
        st = states.get(d)
        if st is None or st.read == 0:
            raise DataError(f"domain '{d}' in {source.label} is empty: it has no document.")
        if len(st.spool) == 0:
            raise DataError(
                f"domain '{d}' has no document left after filtering: of {st.read} read, "
                f"{st.empty} were empty, {st.short} shorter than min_chars={cfg.min_chars}, "
                f"{st.duplicate} duplicates. Lower --min-chars or check the text field."
            )
    return names


# --- the pipeline ---------------------------------------------------------------------------


def _open_source(cfg: PrepareConfig) -> TextSource:
    if cfg.source == BUILTIN:
        return BuiltinSource(cfg.domains or None)
    return open_source(cfg.source, cfg.text_field, cfg.domain_column)


def inputs_hash(cfg: PrepareConfig, source: TextSource) -> str:
    """SHA-256 over everything that decides the output: options, inputs, code versions."""
    import tokenizers

    options = dataclasses.asdict(cfg)
    options.pop("out")
    options["max_bytes_per_domain"] = max_bytes(cfg)
    if cfg.tokenizer:
        options["tokenizer"] = (
            bpe.sha256_file(cfg.tokenizer) if Path(cfg.tokenizer).is_file() else cfg.tokenizer
        )
    payload = {
        "pipeline": PIPELINE_VERSION,
        "format": FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
        "options": options,
        "inputs": source.fingerprint(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _up_to_date(out: Path, digest: str) -> DataDir | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        data = DataDir.open(out)
    except DataError:
        return None
    return data if data.manifest.inputs_hash == digest else None


def _check_out(out: Path, cfg: PrepareConfig) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file; give a folder for the data dir.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(
            f"--out '{out}' exists and is not a mixlab data dir (no {MANIFEST}); refusing to "
            "replace it. Choose another folder or remove it."
        )
    if cfg.source != BUILTIN:
        src, dst = Path(cfg.source).resolve(), out.resolve()
        if src.is_dir() and (dst == src or src in dst.parents):
            raise DataError(
                f"--out '{out}' is inside the source folder '{cfg.source}'; put it elsewhere."
            )


def _tokenizer_sample(
    states: dict[str, _DomainIngest], names: list[str], cfg: PrepareConfig
) -> tuple[Iterator[str], int]:
    per_domain = int(cfg.tokenizer_sample_mb * 1e6) // len(names)
    streams = {}
    for d in names:
        spool = states[d].spool
        rng = np.random.default_rng([cfg.seed, zlib.crc32(d.encode("utf-8")), 1])
        streams[d] = spool.read(rng.permutation(len(spool)))
    return bpe.balanced_sample(streams, per_domain), per_domain


def _train_or_copy_tokenizer(
    given: Any,
    states: dict[str, _DomainIngest],
    names: list[str],
    cfg: PrepareConfig,
    tmp: Path,
    say: Log,
) -> tuple[Any, int]:
    """The tokenizer to encode with, saved as ``tmp/tokenizer.json``; and the sample bytes per domain."""
    if given is not None:
        # Copied byte for byte, so the manifest's hash is the hash of the user's file.
        shutil.copyfile(cfg.tokenizer, tmp / TOKENIZER)
        return given, 0
    texts, per_domain = _tokenizer_sample(states, names, cfg)
    say(
        f"training a byte-level BPE ({cfg.vocab_size} ids) on up to "
        f"{per_domain / 1e6:.2f} MB per domain ..."
    )
    tok = bpe.train_bpe(texts, cfg.vocab_size, cfg.eos_token)
    tok.save(str(tmp / TOKENIZER))
    return tok, per_domain


def _write_domain(
    st: _DomainIngest,
    labels: np.ndarray,
    tok: Any,
    eos: int,
    dtype: np.dtype,
    cfg: PrepareConfig,
    tmp: Path,
    progress: bool,
) -> dict[str, SplitInfo]:
    """Encode a domain's spooled documents in batches and append each to its split's shards."""
    from tqdm import tqdm

    writers = {s: ShardWriter(tmp, st.name, s, dtype, cfg.shard_tokens) for s in SPLITS}
    offsets = st.spool.offsets
    with tqdm(
        total=st.bytes,
        desc=f"encoding {st.name}",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=True if not progress else None,
    ) as bar:
        for start, texts in st.spool.batches():
            for j, ids in enumerate(bpe.encode_documents(tok, texts, eos), start=start):
                writers[SPLITS[labels[j]]].add(ids)
            bar.update(offsets[start + len(texts)] - offsets[start])
    return {s: w.close() for s, w in writers.items()}


def _extra(
    cfg: PrepareConfig,
    source: TextSource,
    states: dict[str, _DomainIngest],
    names: list[str],
    trained: bool,
    sample_bytes: int,
) -> dict[str, Any]:
    """The manifest's free-form record of how the data dir was made."""
    extra: dict[str, Any] = {
        "prepare": {**dataclasses.asdict(cfg), "max_bytes_per_domain": max_bytes(cfg)},
        "dropped": {
            d: {
                "empty": states[d].empty,
                "short": states[d].short,
                "duplicate": states[d].duplicate,
            }
            for d in names
        },
        "capped": {d: states[d].capped for d in names},
        "notes": list(source.notes),
        "tokenizer": {"trained": trained, "sample_bytes_per_domain": sample_bytes},
    }
    if source.label == BUILTIN:
        extra["builtin_sources"] = {d: BUILTIN_SOURCES[d] for d in names}
        extra["packages"] = package_versions()
    return extra


def prepare(
    cfg: PrepareConfig, *, log: Log | None = None, progress: bool = False, command: str = ""
) -> DataDir:
    """Build the data dir ``cfg.out`` from ``cfg.source`` and return it opened.

    ``log`` receives one line per stage (and the notice that nothing needed doing);
    ``progress`` shows tqdm bars on stderr when it is a terminal; ``command`` is recorded in the
    manifest (default: the equivalent ``mixlab prepare`` command line).
    """
    say = log or (lambda _msg: None)
    out = Path(cfg.out)
    source = _open_source(cfg)
    digest = inputs_hash(cfg, source)
    existing = _up_to_date(out, digest)
    if existing is not None:
        say(f"{out} is up to date (same inputs and options, hash {digest[:12]}); nothing to do.")
        return existing
    _check_out(out, cfg)
    given = bpe.load_tokenizer(cfg.tokenizer, cfg.eos_token) if cfg.tokenizer else None

    with atomic_dir(out) as tmp:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        say(f"reading {source.label} ...")
        states = _ingest(source, cfg, scratch, progress)
        for note in source.notes:
            say(f"note: {note}")
        names = _check_ingest(states, source, cfg)
        # Split before training the tokenizer, so that too small a domain fails fast.
        labels = {}
        for d in names:
            st = states[d]
            _, n_val, n_test = split_counts(
                len(st.spool), cfg.val_fraction, cfg.test_fraction, cfg.min_split_docs, d
            )
            labels[d] = assign_splits(len(st.spool), n_val, n_test, cfg.seed, d)
            capped = " (capped)" if st.capped else ""
            say(
                f"  {d}: {len(st.spool)} documents, {st.bytes / 1e6:.2f} MB{capped}, "
                f"dropped {st.dropped}"
            )

        tok, sample_bytes = _train_or_copy_tokenizer(given, states, names, cfg, tmp, say)
        vocab, eos = bpe.vocab_size(tok), bpe.eos_id(tok, cfg.eos_token)
        dtype = dtype_for_vocab(vocab)
        infos = []
        for d in names:
            st = states[d]
            splits = _write_domain(st, labels[d], tok, eos, dtype, cfg, tmp, progress)
            infos.append(
                DomainInfo(
                    name=d,
                    splits=splits,
                    source=source.origin(d),
                    bytes=st.bytes,
                    replaced_chars=st.replaced,
                    dropped_docs=st.dropped,
                )
            )
        shutil.rmtree(scratch)
        manifest = Manifest(
            domains=infos,
            vocab_size=vocab,
            eos_id=eos,
            dtype=dtype.name,
            tokenizer_sha256=bpe.sha256_file(tmp / TOKENIZER),
            created_by=f"mixlab {__version__}",
            command=command or equivalent_command(cfg),
            source=source.label,
            inputs_hash=digest,
            seed=cfg.seed,
            extra=_extra(cfg, source, states, names, given is None, sample_bytes),
        )
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
    return DataDir.open(out)


# --- reporting ------------------------------------------------------------------------------


def summary_table(data: DataDir) -> str:
    """A plain-text table: per domain, documents and tokens per split, MB of text, dropped docs."""
    header = [
        "domain",
        *(f"docs {s}" for s in SPLITS),
        *(f"tokens {s}" for s in SPLITS),
        "MB text",
        "dropped",
        "replaced",
    ]
    rows: list[list[str]] = []
    totals = np.zeros(2 * len(SPLITS) + 3, dtype=np.float64)
    for d in data.manifest.domains:
        docs = [d.splits[s].docs if s in d.splits else 0 for s in SPLITS]
        toks = [d.splits[s].tokens if s in d.splits else 0 for s in SPLITS]
        values = [*docs, *toks, d.bytes / 1e6, d.dropped_docs, d.replaced_chars]
        totals += np.asarray(values, dtype=np.float64)
        rows.append(
            [
                d.name,
                *(f"{v:,}" for v in docs + toks),
                f"{d.bytes / 1e6:.2f}",
                f"{d.dropped_docs:,}",
                f"{d.replaced_chars:,}",
            ]
        )
    t = totals.tolist()
    rows.append(
        [
            "total",
            *(f"{int(v):,}" for v in t[: 2 * len(SPLITS)]),
            f"{t[-3]:.2f}",
            f"{int(t[-2]):,}",
            f"{int(t[-1]):,}",
        ]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    rule = "-" * len(line(header))
    m = data.manifest
    footer = f"vocab {m.vocab_size} ({m.dtype}), eos id {m.eos_id}, tokenizer sha256 {m.tokenizer_sha256[:12]}"
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), footer])
