"""Raw text -> a prepared data dir (tokenizer + per-domain token shards + manifest).

``prepare(cfg)`` runs four stages, all inside a temporary sibling of ``cfg.out`` that replaces
it only when complete (``atomic_dir``), so a failure leaves what was at ``out`` untouched:

1. read (``mixlab.data.ingest``): stream every document of the source, clean it in worker
   processes, drop empty, short and exact-duplicate documents (per domain, by digest), stop a
   domain at its byte cap, and spool the kept UTF-8 text to a scratch file per domain;
2. split: per domain, a seeded permutation of its documents gives disjoint test/val/train sets
   (before any tokenizer work, so that too small a domain fails fast);
3. tokenizer: train a byte-level BPE on a sample with equal bytes per domain, or load one;
4. encode (``mixlab.data.encode``): workers tokenize runs of spooled documents; the main process
   appends them, in order, to shards of at most about ``shard_tokens`` tokens.

Memory: the text and token buffers in flight stay under ``memory_mb`` (``BufferPlan``), and per
document only a spool offset, a split label and (while reading) a digest are kept; the output is
the same for any ``workers`` and ``memory_mb``, which are therefore left out of the inputs hash
and of the manifest. Re-running with the same inputs and options is a no-op: ``inputs_hash``
covers the options, the input files (paths, sizes, mtimes) or package versions, and the
tokenizers version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import time
import zlib
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
from mixlab.data.encode import EncodeJob, encode_domains
from mixlab.data.format import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKENIZER,
    DataDir,
    DomainInfo,
    Manifest,
    atomic_dir,
    check_replaceable,
    dtype_for_vocab,
    open_if_current,
    write_json_atomic,
)
from mixlab.data.ingest import DomainIngest, check_ingest, clean_text, ingest
from mixlab.data.parallel import (
    AUTO_START_BYTES,
    MIN_MEMORY_MB,
    BufferPlan,
    OrderedPool,
    resolve_workers,
)
from mixlab.data.sources import TextSource, check_domain_name, open_source
from mixlab.errors import ConfigError, DataError

__all__ = [
    "PrepareConfig",
    "assign_splits",
    "clean_text",
    "equivalent_command",
    "prepare",
    "split_counts",
    "summary_table",
]

PIPELINE_VERSION = 1
"""Bumped whenever cleaning, splitting or encoding changes, so that data dirs are rebuilt."""
SHARD_BYTES = 1 << 29
"""With ``shard_tokens`` unset, a shard is closed once it holds 512 MiB of ids: 268,435,456
uint16 or 134,217,728 uint32 tokens."""
EXECUTION_OPTIONS = ("workers", "memory_mb")
"""Options that change how prepare runs, never what it writes: not hashed, not recorded."""

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
    shard_tokens: int | None = None
    """Close a shard once it holds at least this many tokens and start the next (a shard exceeds
    it by less than its last document); 0 = one shard per domain split; unset = 512 MiB of ids
    (``SHARD_BYTES``: 268,435,456 uint16 or 134,217,728 uint32 tokens)."""
    domains: list[str] = field(default_factory=list)
    """Prepare only these domains (empty = all); manifest order stays the source's order."""
    workers: int = 1
    """Processes that clean and tokenize, one core each; 1 = all in this process; 0 = min(CPUs,
    4), started once 8 MB of text has gone through (reading and encoding both count), so small
    corpora stay in this process. The output is the same for any value. Workers are started with
    ``spawn``, which re-imports the main script: a script that asks for workers must call
    ``prepare`` under ``if __name__ == "__main__":`` (the CLI defaults to 0)."""
    memory_mb: float = 1024.0
    """Cap, in MB (10^6 bytes, at least 8), on the text and token buffers in flight in all
    processes together; batch sizes follow from it (``BufferPlan``). Not counted: the
    interpreters, each worker's tokenizer and word cache, the tokenizer training sample, and
    9 bytes per document (35-61 while reading). The output is the same for any value."""

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
        for name in ("min_split_docs", "min_chars", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.shard_tokens is not None and self.shard_tokens < 0:
            raise ConfigError(
                f"shard_tokens must be >= 0 (0 = one shard), got {self.shard_tokens}."
            )
        if not self.memory_mb >= MIN_MEMORY_MB:
            raise ConfigError(
                f"memory_mb must be at least {MIN_MEMORY_MB:g}, got {self.memory_mb}."
            )
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


def shard_tokens(cfg: PrepareConfig, dtype: np.dtype) -> int:
    """The shard size in force for ids of ``dtype`` (0 = unlimited)."""
    if cfg.shard_tokens is not None:
        return cfg.shard_tokens
    return SHARD_BYTES // dtype.itemsize


def equivalent_command(cfg: PrepareConfig) -> str:
    """The ``mixlab prepare`` command line that makes the same data dir (defaults left out)."""
    args = ["mixlab", "prepare", "--source", cfg.source, "--out", cfg.out]
    defaults = PrepareConfig()
    for f in dataclasses.fields(cfg):
        if f.name in ("source", "out", *EXECUTION_OPTIONS):
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


# --- the pipeline ---------------------------------------------------------------------------


def _open_source(cfg: PrepareConfig) -> TextSource:
    if cfg.source == BUILTIN:
        return BuiltinSource(cfg.domains or None)
    return open_source(cfg.source, cfg.text_field, cfg.domain_column)


def inputs_hash(cfg: PrepareConfig, source: TextSource) -> str:
    """SHA-256 over everything that decides the output: options, inputs, code versions."""
    import tokenizers

    options = dataclasses.asdict(cfg)
    for name in ("out", *EXECUTION_OPTIONS):
        options.pop(name)
    options["max_bytes_per_domain"] = max_bytes(cfg)
    if cfg.tokenizer:
        # A file's sha256 (as before), or the hash of what a model dir or cached name resolves to.
        options["tokenizer"] = bpe.tokenizer_fingerprint(cfg.tokenizer)
    payload = {
        "pipeline": PIPELINE_VERSION,
        "format": FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
        "options": options,
        "inputs": source.fingerprint(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def _check_out(out: Path, cfg: PrepareConfig) -> None:
    check_replaceable(out)
    if cfg.source != BUILTIN:
        src, dst = Path(cfg.source).resolve(), out.resolve()
        if src.is_dir() and (dst == src or src in dst.parents):
            raise DataError(
                f"--out '{out}' is inside the source folder '{cfg.source}'; put it elsewhere."
            )


def _tokenizer_sample(
    states: dict[str, DomainIngest], names: list[str], cfg: PrepareConfig
) -> tuple[Iterator[str], int]:
    per_domain = int(cfg.tokenizer_sample_mb * 1e6) // len(names)
    streams = {}
    for d in names:
        spool = states[d].spool
        rng = np.random.default_rng([cfg.seed, zlib.crc32(d.encode("utf-8")), 1])
        # A document is cut to the domain's share before it is decoded; balanced_sample would
        # cut it there anyway, so the sample is the same, without reading huge documents whole.
        streams[d] = spool.read(rng.permutation(len(spool)), max_bytes=per_domain)
    return bpe.balanced_sample(streams, per_domain), per_domain


def _train_or_copy_tokenizer(
    given: Any,
    states: dict[str, DomainIngest],
    names: list[str],
    cfg: PrepareConfig,
    tmp: Path,
    say: Log,
) -> tuple[Any, int, dict[str, Any]]:
    """The tokenizer to encode with, saved as ``tmp/tokenizer.json`` with the transformers files
    beside it; the sample bytes per domain; and the manifest's record of the tokenizer."""
    if given is not None:
        # A tokenizer.json is copied byte for byte, so the manifest's hash is the hash of the
        # user's file; a model dir or cached name writes the tokenizer transformers uses.
        return given, 0, bpe.write_tokenizer(tmp, cfg.tokenizer, cfg.eos_token)
    texts, per_domain = _tokenizer_sample(states, names, cfg)
    say(
        f"training a byte-level BPE ({cfg.vocab_size} ids) on up to "
        f"{per_domain / 1e6:.2f} MB per domain ..."
    )
    tok = bpe.train_bpe(texts, cfg.vocab_size, cfg.eos_token)
    return tok, per_domain, bpe.write_tokenizer(tmp, tok, cfg.eos_token)


def _extra(
    cfg: PrepareConfig,
    source: TextSource,
    states: dict[str, DomainIngest],
    names: list[str],
    trained: bool,
    sample_bytes: int,
    shards: int,
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    """The manifest's free-form record of how the data dir was made."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_OPTIONS}
    extra: dict[str, Any] = {
        "prepare": {**options, "max_bytes_per_domain": max_bytes(cfg), "shard_tokens": shards},
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
        "tokenizer": {"trained": trained, "sample_bytes_per_domain": sample_bytes, **tokenizer},
    }
    if source.label == BUILTIN:
        extra["builtin_sources"] = {d: BUILTIN_SOURCES[d] for d in names}
        extra["packages"] = package_versions()
    return extra


def _refuse_in_worker_bootstrap() -> None:
    """Raise when called while a spawned process re-imports the main script.

    That happens when a script calls ``prepare`` with workers at module level: each worker
    would run the whole script again (another prepare of the same data dir) before serving.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise DataError(
            "prepare() was called while a worker process imported the main script; call it "
            'under `if __name__ == "__main__":` when workers > 1 (or use --workers 1).'
        )


def _rate(n_bytes: int, seconds: float) -> str:
    return (
        f"{n_bytes / 1e6:.2f} MB in {seconds:.1f} s ({n_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s)"
    )


def prepare(
    cfg: PrepareConfig, *, log: Log | None = None, progress: bool = False, command: str = ""
) -> DataDir:
    """Build the data dir ``cfg.out`` from ``cfg.source`` and return it opened.

    ``log`` receives one line per stage (and the notice that nothing needed doing);
    ``progress`` shows tqdm bars on stderr when it is a terminal; ``command`` is recorded in the
    manifest (default: the equivalent ``mixlab prepare`` command line).
    """
    _refuse_in_worker_bootstrap()
    say = log or (lambda _msg: None)
    out = Path(cfg.out)
    source = _open_source(cfg)
    digest = inputs_hash(cfg, source)
    existing = open_if_current(out, digest)
    if existing is not None:
        say(f"{out} is up to date (same inputs and options, hash {digest[:12]}); nothing to do.")
        return existing
    _check_out(out, cfg)
    given = bpe.load_tokenizer(cfg.tokenizer, cfg.eos_token) if cfg.tokenizer else None
    workers = resolve_workers(cfg.workers)
    plan = BufferPlan.from_cap(cfg.memory_mb, workers)
    start_after = AUTO_START_BYTES if cfg.workers == 0 else 0

    # The pool is inside atomic_dir: on failure it stops its workers before the scratch files
    # they read are removed.
    with atomic_dir(out) as tmp, OrderedPool(workers, plan.depth, start_after) as pool:
        scratch = tmp / "_scratch"
        scratch.mkdir()
        say(
            f"reading {source.label} ({workers} worker process(es) at most, buffers capped at "
            f"{cfg.memory_mb:g} MB) ..."
        )
        t0 = time.perf_counter()
        states = ingest(
            source,
            domains=cfg.domains,
            min_chars=cfg.min_chars,
            max_bytes=max_bytes(cfg),
            scratch=scratch,
            pool=pool,
            batch_bytes=plan.read_batch_bytes,
            progress=progress,
        )
        for note in source.notes:
            say(f"note: {note}")
        names = check_ingest(states, source, cfg.domains, cfg.min_chars)
        kept = sum(states[d].bytes for d in names)
        say(f"read and cleaned: kept {_rate(kept, time.perf_counter() - t0)}")
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

        tok, sample_bytes, tok_record = _train_or_copy_tokenizer(
            given, states, names, cfg, tmp, say
        )
        vocab, eos = bpe.vocab_size(tok), bpe.eos_id(tok, cfg.eos_token)
        dtype = dtype_for_vocab(vocab)
        shards = shard_tokens(cfg, dtype)
        tokenizer_sha = bpe.sha256_file(tmp / TOKENIZER)
        job = EncodeJob(
            tokenizer=str(tmp / TOKENIZER),
            tokenizer_sha256=tokenizer_sha,
            eos_token=cfg.eos_token,
            dtype=dtype.name,
            piece_bytes=plan.piece_bytes,
            cut=bpe.cuts_exactly(tok),
        )
        splits, seconds = encode_domains(
            states,
            names,
            labels,
            job,
            out=tmp,
            shard_tokens=shards,
            pool=pool,
            plan=plan,
            progress=progress,
        )
        n_tokens = sum(i.tokens for d in names for i in splits[d].values())
        used = workers if pool.started else 1
        say(f"encoded {_rate(kept, seconds)} into {n_tokens:,} tokens with {used} process(es)")
        infos = [
            DomainInfo(
                name=d,
                splits=splits[d],
                source=source.origin(d),
                bytes=states[d].bytes,
                replaced_chars=states[d].replaced,
                dropped_docs=states[d].dropped,
            )
            for d in names
        ]
        shutil.rmtree(scratch)
        manifest = Manifest(
            domains=infos,
            vocab_size=vocab,
            eos_id=eos,
            dtype=dtype.name,
            tokenizer_sha256=tokenizer_sha,
            created_by=f"mixlab {__version__}",
            command=command or equivalent_command(cfg),
            source=source.label,
            inputs_hash=digest,
            seed=cfg.seed,
            extra=_extra(
                cfg, source, states, names, given is None, sample_bytes, shards, tok_record
            ),
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
