"""``mixlab prepare``: raw text (built-in corpus, a folder, or one file) -> a tokenized data dir."""

from __future__ import annotations

import argparse
import sys

from mixlab.data.prepare import PrepareConfig, prepare, summary_table
from mixlab.data.tokenizer import default_eos_token

_DEFAULTS = PrepareConfig()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="tokenize text into per-domain shards (a data dir)",
        description="Tokenize text into per-domain token shards with a manifest (a data dir). "
        "Re-running with the same inputs and options does nothing.",
    )
    p.add_argument(
        "--source",
        default=_DEFAULTS.source,
        help="'builtin' (5 domains from installed packages); a folder with one "
        "sub-folder per domain (.txt/.jsonl/.parquet, .txt/.jsonl also as .gz/.bz2/.xz/.zst); "
        "one .jsonl/.parquet file with a domain column (--domain-column); either as an fsspec "
        "URL (memory://, s3:// with s3fs, gs:// with gcsfs, hf://); with mixlab[datasets]: a "
        "save_to_disk folder, a folder of json/csv/parquet/arrow files with a domain column or "
        "one such sub-folder per domain, or hf:NAME from the local datasets cache "
        "(default: builtin)",
    )
    p.add_argument("--out", required=True, help="data dir to write (replaced atomically)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=_DEFAULTS.vocab_size,
        help="ids of the byte-level BPE to train (default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        default="",
        help="use this tokenizer instead of training one: a tokenizer.json, a local model "
        "directory (anything transformers.AutoTokenizer loads) or a model name in the local "
        "Hugging Face cache (never downloaded); its vocabulary decides the shard dtype",
    )
    p.add_argument(
        "--eos-token",
        default=None,
        help="special token ending each document (default: the eos_token of a model "
        f"directory's or cached model's tokenizer, else {_DEFAULTS.eos_token})",
    )
    p.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=_DEFAULTS.tokenizer_sample_mb,
        help="MB of text, equal per domain, to train the tokenizer on (default: %(default)s)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=_DEFAULTS.val_fraction,
        help="fraction of documents per domain for validation (default: %(default)s)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=_DEFAULTS.test_fraction,
        help="fraction of documents per domain for test (default: %(default)s)",
    )
    p.add_argument(
        "--min-split-docs",
        type=int,
        default=_DEFAULTS.min_split_docs,
        help="at least this many documents in val and in test (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=_DEFAULTS.seed, help="seed of the splits (default: 0)"
    )
    p.add_argument(
        "--text-field",
        default=_DEFAULTS.text_field,
        help="jsonl field / parquet column holding the text (default: %(default)s)",
    )
    p.add_argument(
        "--domain-column",
        default=_DEFAULTS.domain_column,
        help="field/column naming the domain in a single-file source (default: %(default)s)",
    )
    p.add_argument(
        "--min-chars",
        type=int,
        default=_DEFAULTS.min_chars,
        help="drop documents shorter than this (default: %(default)s)",
    )
    p.add_argument(
        "--max-mb-per-domain",
        type=float,
        default=None,
        help="keep about this many MB of text per domain, 0 = all "
        "(default: 6 for builtin, all otherwise)",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        help="close a shard once it holds this many tokens, 0 = one shard per split "
        "(default: 512 MiB of ids, 268,435,456 uint16 or 134,217,728 uint32 tokens)",
    )
    p.add_argument("--domains", default="", help="comma-separated subset of domains to prepare")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that clean and tokenize, one core each; 1 = in this process; "
        "0 = min(CPUs, 4), started once 8 MB of text has gone through (default: 0). "
        "The output does not depend on it",
    )
    p.add_argument(
        "--memory-mb",
        type=float,
        default=_DEFAULTS.memory_mb,
        help="cap on the text and token buffers in flight, all processes together, in MB, "
        "at least 8 (default: %(default)g). The output does not depend on it",
    )
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """The ``PrepareConfig`` the flags describe (validated)."""
    mb = args.max_mb_per_domain
    eos = args.eos_token
    if eos is None:
        eos = default_eos_token(args.tokenizer) if args.tokenizer else _DEFAULTS.eos_token
    return PrepareConfig(
        source=args.source,
        out=args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        eos_token=eos,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        min_split_docs=args.min_split_docs,
        seed=args.seed,
        text_field=args.text_field,
        domain_column=args.domain_column,
        min_chars=args.min_chars,
        max_bytes_per_domain=None if mb is None else round(mb * 1e6),
        shard_tokens=args.shard_tokens,
        domains=[d.strip() for d in args.domains.split(",") if d.strip()],
        workers=args.workers,
        memory_mb=args.memory_mb,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = prepare(cfg, log=log, progress=True)
    print(summary_table(data))
    print(f"data dir: {data.root}")
    return 0
