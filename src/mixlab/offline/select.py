"""``select(cfg)``: write a data dir holding the DSIR-selected part of another one.

* **What is selected.** Only the *train* split: its documents are cut into pieces of at most
  ``chunk_tokens`` tokens (as ``mixlab cluster`` cuts them, ``mixlab.data.cluster.build_units``:
  near-equal pieces, an EOS inserted after every piece but a document's last), so importance
  weights compare pieces of similar length; ``fraction`` of the pieces are kept
  (``mixlab.offline.dsir``). Validation and test splits are copied unchanged, so runs on the
  selected data are evaluated on exactly the same windows as runs on the pool.
* **Domains are kept.** A selected piece stays in its domain, so mixing methods still work on
  the selection. A domain left with fewer than ``min_tokens`` train tokens (no training window)
  is dropped and reported; none left is an error. A domain that keeps less than
  ``STARVED_SHARE`` (10%) of ``fraction`` of its pieces is named in a warning: one pooled
  selection mostly re-weights domains, and a per-domain mixer then draws that domain's whole
  share from a few pieces.
* **Pooled or per domain.** By default one selection runs over all pieces against the whole
  target (``fraction`` of all pieces). With ``per_domain`` each domain keeps ``fraction`` of its
  own pieces, chosen by DSIR within the domain (the raw model is fitted on that domain's
  pieces) against the target documents of the same domain: a data dir target's train documents
  of the same-named domain; the pool itself as the target (``--target`` = ``--data``) gives each
  domain's own validation documents. A domain the target lacks (or a target without domains, a
  text file/folder) is selected against the whole target, and the log says so.
  ``domain:NAME`` is refused with ``per_domain`` (one domain's documents are no per-domain target).
* **The target** is one of: a data dir (its train documents, every domain; it must use the
  pool's tokenizer), a ``.txt``/``.jsonl`` file or a folder of them (encoded with the pool's
  tokenizer), or ``domain:NAME`` (the validation documents of the pool's domain NAME; those are
  then not independent of that domain's evaluation). With ``per_domain``, see above.
* **Output.** Same tokenizer (copied), same format; ``manifest.extra["dsir"]`` records the
  options, the target, the pieces and tokens kept per domain and the dropped domains;
  ``OUT/dsir/selected.npy`` is int64 [k, 4] (source domain, source document, start, end) of
  every kept piece. Built in a temporary folder renamed at the end; re-running with the same
  input, target and options is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixlab import __version__
from mixlab.data.format import (
    MANIFEST,
    SPLITS,
    TOKENIZER,
    DataDir,
    DomainInfo,
    Manifest,
    ShardWriter,
    atomic_dir,
    check_replaceable,
    open_if_current,
    write_json_atomic,
)
from mixlab.errors import ConfigError, DataError
from mixlab.offline.dsir import dsir_select, gumbel_top_k, select_count

SELECT_VERSION = 1
"""Bumped whenever features, sampling or the output layout change, so outputs are rebuilt."""

STARVED_SHARE = 0.1
"""Warn when a domain keeps less than this times ``fraction`` of its train pieces."""

Log = Callable[[str], None]


@dataclass
class SelectConfig:
    """Options of ``mixlab select`` (each has a CLI flag of the same name, with dashes)."""

    data: str = ""
    """The prepared data dir to select from (the pool)."""
    target: str = ""
    """A data dir, a .txt/.jsonl file or folder, or ``domain:NAME`` (see the module docstring)."""
    fraction: float = 0.5
    """Share of the pool's train pieces to keep, in (0, 1]."""
    out: str = ""
    """The data dir to write (replaced atomically; an existing non-data folder is refused)."""
    seed: int = 0
    """Seed of the resampling (Gumbel top-k)."""
    buckets: int = 10_000
    """Hash buckets of the n-gram features (DSIR's default)."""
    ngrams: int = 2
    """Longest n-gram: 2 = unigrams and bigrams of token ids (DSIR's default)."""
    smoothing: float = 1e-8
    """Added to every bucket probability of both models before the log (the reference code's 1e-8)."""
    chunk_tokens: int = 1024
    """Cut train documents into pieces of at most this many tokens (0 = whole documents)."""
    min_tokens: int = 257
    """Drop a domain left with fewer train tokens than this (seq_len + 1 gives one window)."""
    per_domain: bool = False
    """Keep ``fraction`` of each domain's pieces, each domain against its own target documents."""

    def __post_init__(self) -> None:
        if not self.data or not self.out or not self.target:
            raise ConfigError("select needs --data (the pool), --target and --out.")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}.")
        if self.buckets < 1 or self.ngrams < 1 or self.smoothing <= 0:
            raise ConfigError("buckets and ngrams must be >= 1 and smoothing > 0.")
        if self.chunk_tokens != 0 and self.chunk_tokens < 8:
            raise ConfigError(f"chunk_tokens must be 0 or at least 8, got {self.chunk_tokens}.")
        if self.min_tokens < 1:
            raise ConfigError(f"min_tokens must be at least 1, got {self.min_tokens}.")
        if self.per_domain and self.target.startswith("domain:"):
            raise ConfigError(
                "--per-domain selects each domain against its own target documents; "
                f"'--target {self.target}' is one domain's. Give --target {self.data or 'POOL'} "
                "(each domain's own validation documents), a data dir with the same domain names, "
                "or a text target (used whole for every domain)."
            )


def _target_dir(path: Path, data: DataDir) -> DataDir:
    tgt = DataDir.open(path)
    if tgt.manifest.tokenizer_sha256 != data.manifest.tokenizer_sha256:
        raise DataError(
            f"target data dir '{path}' uses another tokenizer than '{data.root}'; prepare it "
            f"with --tokenizer {data.root / TOKENIZER}, or give its text files instead."
        )
    return tgt


def _split_documents(data: DataDir, domain: str, split: str) -> list[np.ndarray]:
    """Token ids (EOS removed) of the documents of one split of one domain."""
    sp = data.split(domain, split)
    return [sp.document(j)[:-1] for j in range(sp.n_docs)]


def target_documents(target: str, data: DataDir) -> list[np.ndarray]:
    """Token ids (EOS removed) of the target's documents, in the pool's tokenizer."""
    if target.startswith("domain:"):
        return _split_documents(data, target[len("domain:") :], "val")
    path = Path(target)
    if (path / MANIFEST).is_file():
        tgt = _target_dir(path, data)
        return [doc for d in tgt.domains for doc in _split_documents(tgt, d, "train")]
    if not path.exists():
        raise ConfigError(
            f"--target '{target}' does not exist; give a data dir, a .txt/.jsonl file or folder, "
            "or domain:NAME."
        )
    from mixlab.data.tokenizer import encode_documents
    from mixlab.train.target import _read_texts

    texts = _read_texts(path)
    return [ids[:-1] for ids in encode_documents(data.tokenizer(), texts, data.eos_id)]


def domain_target_documents(
    target: str, data: DataDir
) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    """(pool domain -> its own target documents, the whole target) for ``per_domain``.

    A data dir: the train documents of its domain of the same name (whole target: all its train
    documents). The pool itself: each domain's validation documents (whole: all of them). A text
    file/folder has no domains: the mapping is empty. Documents without a token are left out;
    a domain left with none is not in the mapping (it is selected against the whole target).
    """
    if target.startswith("domain:"):
        raise ConfigError(f"--per-domain cannot use '--target {target}' (one domain's documents).")
    path = Path(target)
    own: dict[str, list[np.ndarray]] = {}
    if (path / MANIFEST).is_file():
        if path.resolve() == data.root.resolve():
            tgt, split = data, "val"
        else:
            tgt, split = _target_dir(path, data), "train"
        docs = {d: [x for x in _split_documents(tgt, d, split) if x.size] for d in tgt.domains}
        own = {d: docs[d] for d in data.domains if docs.get(d)}
        return own, [x for d in tgt.domains for x in docs[d]]
    return own, [d for d in target_documents(target, data) if d.size]


def _hash_docs(docs: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(np.asarray(d, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def inputs_hash(
    cfg: SelectConfig,
    data: DataDir,
    target_docs: list[np.ndarray],
    own_docs: dict[str, list[np.ndarray]] | None = None,
) -> str:
    """SHA-256 over the pool's manifest, the target's tokens (with ``per_domain``: also which
    documents each domain is selected against), the options and the version."""
    options = asdict(cfg)
    for key in ("data", "out", "target"):
        options.pop(key)
    if not cfg.per_domain:
        options.pop("per_domain")  # pooled outputs made before the option existed stay current
    target = _hash_docs(target_docs)
    if cfg.per_domain:
        own = {name: _hash_docs(docs) for name, docs in (own_docs or {}).items()}
        target = hashlib.sha256(json.dumps([target, own], sort_keys=True).encode()).hexdigest()
    payload = {
        "select": SELECT_VERSION,
        "input": hashlib.sha256((data.root / MANIFEST).read_bytes()).hexdigest(),
        "target": target,
        "options": options,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def equivalent_command(cfg: SelectConfig) -> str:
    """The ``mixlab select`` command line that makes the same data dir."""
    args = ["mixlab", "select", "--data", cfg.data, "--target", cfg.target,
            "--fraction", repr(cfg.fraction), "--out", cfg.out]  # fmt: skip
    defaults = SelectConfig.__dataclass_fields__
    for name in ("seed", "buckets", "ngrams", "smoothing", "chunk_tokens", "min_tokens"):
        if getattr(cfg, name) != defaults[name].default:
            args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    if cfg.per_domain:
        args.append("--per-domain")
    return shlex.join(args)


def _select_per_domain(
    cfg: SelectConfig,
    data: DataDir,
    units: Any,
    pool: list[np.ndarray],
    own: dict[str, list[np.ndarray]],
    whole: list[np.ndarray],
    say: Log,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept piece indices ascending, log weights [n]): ``fraction`` of every domain's pieces,
    DSIR within the domain against ``own[domain]`` (``whole`` where it has none)."""
    m = len(data.domains)
    counts = np.bincount(units.domain, minlength=m)
    k = sum(select_count(int(c), cfg.fraction) for c in counts if c)
    say(
        f"DSIR per domain: {units.n} pool pieces in {m} domains, {len(whole)} target documents; "
        f"keeping {cfg.fraction} of each domain's pieces ({k}) ..."
    )
    missing = [data.domains[d] for d in range(m) if counts[d] and data.domains[d] not in own]
    if missing:
        say(
            f"domain(s) {', '.join(missing)}: no target documents of their own; selected against "
            f"the whole target ({len(whole)} documents)"
        )
    chosen, log_w = [], np.zeros(units.n, dtype=np.float64)
    for d in range(m):
        idx = np.flatnonzero(units.domain == d)
        if idx.size == 0:
            continue
        # A stream of its own per domain, fixed by (seed, domain index).
        seed = int(np.random.SeedSequence([cfg.seed, d]).generate_state(1)[0])
        pieces = [pool[i] for i in idx.tolist()]
        if not any(p.size for p in pieces):  # nothing to weigh: a uniform draw
            lw = np.zeros(idx.size)
            sel = gumbel_top_k(lw, select_count(idx.size, cfg.fraction), seed)
        else:
            sel, lw = dsir_select(
                pieces, own.get(data.domains[d], whole), cfg.fraction, seed,
                cfg.buckets, cfg.ngrams, cfg.smoothing,
            )  # fmt: skip
        chosen.append(idx[sel])
        log_w[idx] = lw
    return np.sort(np.concatenate(chosen)), log_w


def select(cfg: SelectConfig, log: Log | None = None) -> DataDir:
    """Write the DSIR selection ``cfg.out`` of ``cfg.data`` against ``cfg.target``; return it."""
    from mixlab.data.cluster import _Corpus

    say = log or (lambda _msg: None)
    data = DataDir.open(cfg.data)
    out = Path(cfg.out)
    if out.resolve() == data.root.resolve():
        raise DataError(f"--out '{out}' is the input data dir; write the selection elsewhere.")
    own: dict[str, list[np.ndarray]] | None = None
    if cfg.per_domain:
        own, tdocs = domain_target_documents(cfg.target, data)
    else:
        tdocs = [d for d in target_documents(cfg.target, data) if d.size]
    if not tdocs:
        raise DataError(f"the target '{cfg.target}' holds no document with a token.")
    digest = inputs_hash(cfg, data, tdocs, own)
    existing = open_if_current(out, digest)
    if existing is not None:
        say(f"{out} is up to date (same input, target and options); nothing to do.")
        return existing
    check_replaceable(out)

    corpus = _Corpus(data, cfg.chunk_tokens)
    u = corpus.units["train"]
    if u.n == 0:
        raise DataError(f"'{data.root}' has no train documents: the pool is empty.")
    pool = [
        corpus.docs.tokens(int(u.domain[i]), "train", int(u.doc[i]))[
            u.start[i] : min(u.end[i], u.doc_len[i] - 1)
        ]
        for i in range(u.n)
    ]
    if own is not None:
        chosen, log_w = _select_per_domain(cfg, data, u, pool, own, tdocs, say)
    else:
        k = select_count(u.n, cfg.fraction)
        say(f"DSIR: {len(tdocs)} target documents, {u.n} pool pieces; keeping {k} ...")
        chosen, log_w = dsir_select(
            pool, tdocs, cfg.fraction, cfg.seed, cfg.buckets, cfg.ngrams, cfg.smoothing
        )
    keep = np.zeros(u.n, dtype=bool)
    keep[chosen] = True

    m = len(data.domains)
    pieces = np.bincount(u.domain[keep], minlength=m)
    tokens = np.bincount(u.domain[keep], weights=u.tokens[keep], minlength=m).astype(np.int64)
    pool_pieces = np.bincount(u.domain, minlength=m)
    for d in np.flatnonzero(pieces < STARVED_SHARE * cfg.fraction * pool_pieces).tolist():
        hint = "" if cfg.per_domain else " (pooled DSIR re-weights domains; see --per-domain)"
        say(
            f"warning: domain {data.domains[d]} keeps {pieces[d] / pool_pieces[d]:.1%} of its "
            f"train pieces ({int(pieces[d]):,} of {int(pool_pieces[d]):,}) at --fraction "
            f"{cfg.fraction}{hint}"
        )
    kept = [d for d in range(m) if tokens[d] >= cfg.min_tokens]
    dropped = [data.domains[d] for d in range(m) if d not in kept]
    if not kept:
        raise DataError(
            f"no domain keeps {cfg.min_tokens} train tokens after selection; raise --fraction."
        )
    if dropped:
        say(f"dropping domain(s) {', '.join(dropped)}: fewer than {cfg.min_tokens} tokens selected")

    per_domain_info: dict[str, Any] = {}
    if own is not None:
        per_domain_info = {
            "target_docs_per_domain": {n: len(own.get(n, tdocs)) for n in data.domains},
            "whole_target_domains": [n for n in data.domains if n not in own],
        }
    with atomic_dir(out) as tmp:
        shutil.copyfile(data.root / TOKENIZER, tmp / TOKENIZER)
        (tmp / "dsir").mkdir()
        table = np.stack([u.domain, u.doc, u.start, u.end], axis=1)[keep].astype(np.int64)
        np.save(tmp / "dsir" / "selected.npy", table)
        infos = []
        for d in kept:
            name = data.domains[d]
            splits = {}
            for s in SPLITS:
                w = ShardWriter(tmp, name, s, data.dtype)
                if s == "train":
                    for i in np.flatnonzero(keep & (u.domain == d)).tolist():
                        w.add(corpus.piece("train", i))
                else:
                    for j in range(corpus.docs.lengths(d, s).size):
                        w.add(corpus.docs.tokens(d, s, j))
                splits[s] = w.close()
            src = data.manifest.domain(name)
            infos.append(DomainInfo(name=name, splits=splits, source=f"DSIR selection of {src.source}"))
        src = data.manifest
        manifest = Manifest(
            domains=infos,
            vocab_size=src.vocab_size,
            eos_id=src.eos_id,
            dtype=src.dtype,
            tokenizer_sha256=src.tokenizer_sha256,
            created_by=f"mixlab {__version__}",
            command=equivalent_command(cfg),
            source=src.source,
            inputs_hash=digest,
            seed=cfg.seed,
            extra={
                "dsir": {
                    "version": SELECT_VERSION,
                    "options": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out")},
                    "target_docs": len(tdocs),
                    "pool_pieces": int(u.n),
                    "selected_pieces": int(keep.sum()),
                    "pieces_per_domain": {data.domains[d]: int(pieces[d]) for d in range(m)},
                    "tokens_per_domain": {data.domains[d]: int(tokens[d]) for d in range(m)},
                    "pool_tokens_per_domain": {
                        data.domains[d]: int(u.tokens[u.domain == d].sum()) for d in range(m)
                    },
                    "dropped_domains": dropped,
                    **per_domain_info,
                    "log_weight_quantiles": np.quantile(log_w, [0, 0.25, 0.5, 0.75, 1]).tolist(),
                    "selected": "dsir/selected.npy",
                    "selected_columns": ["source_domain", "source_doc", "start", "end"],
                },
                "selected_from": {
                    "data": str(data.root.resolve()),
                    "manifest_sha256": hashlib.sha256((data.root / MANIFEST).read_bytes()).hexdigest(),
                    "command": src.command,
                },
            },
        )
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
    return DataDir.open(out)


def summary_table(data: DataDir) -> str:
    """Per domain of the pool: train pieces and tokens kept, and the share of the pool kept."""
    info: dict[str, Any] = data.manifest.extra["dsir"]
    rows = [("domain", "pieces kept", "tokens kept", "share of its pool tokens")]
    for name, pieces in info["pieces_per_domain"].items():
        tok, pool = info["tokens_per_domain"][name], info["pool_tokens_per_domain"][name]
        mark = " (dropped)" if name in info["dropped_domains"] else ""
        rows.append((name + mark, f"{pieces:,}", f"{tok:,}", f"{tok / max(1, pool):.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    lines.append(
        f"kept {info['selected_pieces']:,} of {info['pool_pieces']:,} pieces "
        f"(fraction {info['options']['fraction']}"
        + (" of each domain" if info["options"].get("per_domain") else "")
        + f") against {info['target_docs']} target documents"
    )
    return "\n".join(lines)
