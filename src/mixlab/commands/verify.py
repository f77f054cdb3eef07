"""``mixlab verify DATA_DIR ...``: read every byte of prepared data dirs and check it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check every shard of data dirs against the checksums in their manifests",
        description="Read every file of each data dir once and check it against its manifest: "
        "sizes, document offsets, the sha256 of every shard and of the tokenizer, and that every "
        "token id is below vocab_size. Prints one line per problem (on stderr) and exits with "
        "status 2 if there is any. `mixlab train` does the same check on open for data dirs of "
        "up to 1 GiB of shards; this command is how to check larger ones (~1 s per GB).",
    )
    p.add_argument("dirs", nargs="+", metavar="DATA_DIR", help="a prepared data dir")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.data.format import DataDir
    from mixlab.errors import DataError

    failed = 0
    for path in args.dirs:
        t0 = time.perf_counter()
        try:
            data = DataDir.read(path)  # the manifest: a problem there stops this dir's check
        except DataError as exc:
            print(f"mixlab verify: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        problems = data.problems("full")
        for line in problems:
            print(f"mixlab verify: error: {line}", file=sys.stderr)
        for note in data.notes:
            print(f"note: {note}")
        if problems:
            failed += 1
            continue
        shards = data.shards()
        hashed = sum(1 for sh in shards if sh.sha256)
        print(
            f"{path}: ok: {len(shards)} shards, {data.shard_bytes / 1e6:.1f} MB read in "
            f"{time.perf_counter() - t0:.2f} s; {hashed} sha256 checksums match; token ids "
            f"below vocab_size {data.vocab_size}"
        )
    return 2 if failed else 0
