"""``mixlab cluster``: embed the documents of a data dir and k-means them into cluster domains."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from mixlab.config import parse_override
from mixlab.errors import ConfigError

if TYPE_CHECKING:
    from mixlab.data.cluster import ClusterConfig

_HELP_EMBEDDERS = "tfidf (hashed n-grams + SVD, fast on CPU) or minilm (all-MiniLM-L6-v2, offline)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="cluster documents into domains (embeddings + k-means)",
        description="Embed the documents of a prepared data dir (cut into pieces of at most "
        "--chunk-tokens tokens), k-means them (flat, or hierarchical with --coarse) and write a "
        "data dir whose domains are the clusters, with the same tokenizer and splits. "
        "Re-running with the same input and options does nothing.",
    )
    p.add_argument("--data", required=True, help="prepared data dir to cluster")
    p.add_argument("--out", required=True, help="data dir to write (replaced atomically)")
    p.add_argument(
        "--k", type=int, default=64, help="fine clusters, the output's domains (default: 64)"
    )
    p.add_argument(
        "--coarse",
        type=int,
        default=0,
        metavar="K1",
        help="coarse clusters, each split into fine ones; 0 = flat (default: 0)",
    )
    p.add_argument("--embedder", default="tfidf", help=f"{_HELP_EMBEDDERS} (default: tfidf)")
    p.add_argument(
        "--embedder-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an embedder option, e.g. dim=128 (tfidf) or max_windows=2, device=cuda "
        "(minilm); repeatable",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of k-means and of the tfidf fit (default: 0)"
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=1024,
        help="cut documents into pieces of at most this many tokens; 0 = whole "
        "documents (default: 1024)",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=257,
        help="merge clusters with fewer tokens than this in any split into the nearest "
        "one; use seq_len + 1 (default: 257)",
    )
    p.add_argument("--n-init", type=int, default=3, help="k-means restarts (default: 3)")
    p.add_argument(
        "--cache-dir",
        default="",
        help="embedding cache (default: $MIXLAB_CACHE_DIR/embeddings or "
        "~/.cache/mixlab/embeddings)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="do not read or write the embedding cache"
    )
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """The ``ClusterConfig`` the flags describe (validated)."""
    from mixlab.data.cluster import ClusterConfig

    options: dict[str, Any] = {}
    for text in args.embedder_opt:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise ConfigError(f"--embedder-opt '{text}' must look like key=value.")
        options[keys[0]] = value
    return ClusterConfig(
        data=args.data,
        out=args.out,
        k=args.k,
        coarse=args.coarse,
        embedder=args.embedder,
        embedder_options=options,
        seed=args.seed,
        chunk_tokens=args.chunk_tokens,
        min_tokens=args.min_tokens,
        n_init=args.n_init,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )


def run(args: argparse.Namespace) -> int:
    from mixlab.data.cluster import cluster, summary_table

    cfg = config_from_args(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    data = cluster(cfg, log=log, progress=True)
    print(summary_table(data))
    print(f"data dir: {data.root} ({time.perf_counter() - t0:.1f} s)")
    return 0
