"""``mixlab select --data DIR --target TARGET --fraction F --out DIR``: DSIR data selection."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "select",
        help="select the part of a data dir that resembles a target (DSIR)",
        description="Data selection with importance resampling (DSIR): hashed n-grams of token "
        "ids, importance weights of the pool's train pieces against the target, and a draw "
        "without replacement of --fraction of them. Writes a data dir with the same domains, "
        "tokenizer, validation and test splits, usable by every other command. Re-running "
        "with the same input and options does nothing.",
    )
    p.add_argument("--data", required=True, help="prepared data dir to select from (the pool)")
    p.add_argument(
        "--target",
        required=True,
        help="a data dir (its train documents), a .txt/.jsonl file or folder, or domain:NAME "
        "(the validation documents of the pool's domain NAME); with --per-domain, a data dir's "
        "domain of the same name, and the pool itself (= --data) means each domain's own "
        "validation documents",
    )
    p.add_argument(
        "--fraction", type=float, required=True, help="share of the pool's train pieces to keep, in (0, 1]"
    )
    p.add_argument("--out", required=True, help="data dir to write (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--buckets", type=int, default=10_000, help="n-gram hash buckets (default: 10000)")
    p.add_argument("--ngrams", type=int, default=2, help="longest n-gram (default: 2)")
    p.add_argument(
        "--smoothing", type=float, default=1e-8,
        help="added to every n-gram probability before the log (default: 1e-8)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=1024,
        help="cut train documents into pieces of at most this many tokens; 0 = whole documents "
        "(default: 1024)",
    )
    p.add_argument(
        "--min-tokens",
        type=int,
        default=257,
        help="drop a domain left with fewer train tokens; use seq_len + 1 (default: 257)",
    )
    p.add_argument(
        "--per-domain",
        action="store_true",
        help="keep --fraction of every domain's pieces, each domain selected by DSIR within itself "
        "against its own target documents (a domain the target lacks: the whole target); "
        "domain:NAME is refused. One pooled selection mostly re-weights domains and can empty "
        "one; this filters within domains",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.offline.select import SelectConfig, select, summary_table

    cfg = SelectConfig(
        data=args.data,
        target=args.target,
        fraction=args.fraction,
        out=args.out,
        seed=args.seed,
        buckets=args.buckets,
        ngrams=args.ngrams,
        smoothing=args.smoothing,
        chunk_tokens=args.chunk_tokens,
        min_tokens=args.min_tokens,
        per_domain=args.per_domain,
    )
    t0 = time.perf_counter()
    data = select(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(summary_table(data))
    print(f"data dir: {data.root} ({time.perf_counter() - t0:.1f} s)")
    return 0
