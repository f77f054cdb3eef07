"""``mixlab prepare`` on a generated corpus: tokenisation throughput with 1 and 2 workers, and
the peak memory of each run against its memory cap and the corpus size.

Each run is ``python -m mixlab prepare ... --tokenizer TOK`` in a subprocess (the tokenizer is
trained once beforehand, so every run encodes with the same one and no run pays for training).
Peak memory is the largest sum of anonymous resident memory (heap and buffers; shared libraries
and mapped files left out) over the run's process and its worker processes, polled every 10 ms
from /proc (``mixlab.data.parallel.PeakTreeMemory``). The baseline is the same command on a
1 MB corpus, which starts the same interpreters and workers and loads the same tokenizer but
holds almost no text; growth = peak - baseline is what the run's buffers cost. CPU time is the
run's and its workers' user + system time (``RUSAGE_CHILDREN``); CPU / wall is the number of
cores the run actually got, which on a shared machine says whether a second worker found a
free core. Runs of different worker counts alternate, so load hits them alike; medians.

``--datasets`` adds a row per worker count for the same corpus read through Hugging Face
``datasets`` (each domain saved once with ``Dataset.save_to_disk``, then read memory-mapped in
batches by ``mixlab.data.hf_datasets``), and checks that its shards are byte-identical to the
plain jsonl reader's (the shard sha256s of the two manifests).

    python benchmarks/bench_prepare.py [--mb 200] [--memory-mb 64] [--workers 1,2] [--repeats 1]
                                       [--datasets]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixlab.data import tokenizer as bpe
from mixlab.data.parallel import PeakTreeMemory, available_cpus
from mixlab.data.textgen import write_text_corpus

RATE = re.compile(r"([\d.]+) MB in ([\d.]+) s \(([\d.]+) MB/s\)")


def run_prepare(source: Path, out: Path, tok: Path, workers: int, memory_mb: float) -> dict:
    """One prepare run in a subprocess: wall time, stage rates from its log, peak tree RSS."""
    cmd = [
        sys.executable, "-m", "mixlab", "prepare", "--source", str(source), "--out", str(out),
        "--tokenizer", str(tok), "--workers", str(workers), "--memory-mb", str(memory_mb),
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakTreeMemory(proc.pid) as peak:
        _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{stderr}")
    lines = {k: line for line in stderr.splitlines() for k in ("read and", "encoded") if k in line}
    rates = {k: RATE.search(v) for k, v in lines.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "read_mbs": float(rates["read and"].group(3)),
        "encode_s": float(rates["encoded"].group(2)),
        "encode_mbs": float(rates["encoded"].group(3)),
        "text_mb": sum(d["bytes"] for d in manifest["domains"]) / 1e6,
        "tokens": sum(s["tokens"] for d in manifest["domains"] for s in d["splits"].values()),
        "peak_mb": peak.bytes / 1e6,
        "samples": peak.samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size, MB of text")
    ap.add_argument("--memory-mb", type=float, default=64.0, help="prepare's --memory-mb")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--dir", default="", help="work folder (default: a temporary one)")
    ap.add_argument("--datasets", action="store_true",
                    help="also read the corpus through Hugging Face datasets (save_to_disk folders)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = Path(tmp)
        domains = ("alpha", "beta", "gamma", "delta")
        t0 = time.perf_counter()
        corpus_bytes = write_text_corpus(root / "corpus", args.mb, domains, seed=0)
        write_text_corpus(root / "tiny", 1.0, domains, seed=1)
        print(
            f"generated {corpus_bytes / 1e6:.1f} MB of text in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        sample = []
        for d in domains:
            with open(root / "corpus" / d / "part-0000.jsonl", encoding="utf-8") as fh:
                sample += [json.loads(next(fh))["text"] for _ in range(250)]
        tok = bpe.train_bpe(sample, args.vocab_size)
        tok.save(str(root / "tok.json"))

        readers = {"jsonl": ("corpus", "tiny")}
        if args.datasets:
            t0 = time.perf_counter()
            for name in ("corpus", "tiny"):
                save_as_datasets(root / name, root / f"ds-{name}", domains)
            print(f"saved as datasets folders in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            readers["datasets"] = ("ds-corpus", "ds-tiny")
        rows = [(reader, w) for reader in readers for w in workers]
        load_before = os.getloadavg()
        results: dict[tuple[str, int], list[dict]] = {k: [] for k in rows}
        base: dict[tuple[str, int], list[float]] = {k: [] for k in rows}
        for rep in range(args.repeats):
            for reader, w in rows:
                big, tiny = readers[reader]
                b = run_prepare(
                    root / tiny, root / f"b{reader}{w}-{rep}", root / "tok.json", w, args.memory_mb
                )
                base[reader, w].append(b["peak_mb"])
                r = run_prepare(
                    root / big, root / f"o{reader}{w}-{rep}", root / "tok.json", w, args.memory_mb
                )
                results[reader, w].append(r)
                print(f"{reader}, workers {w}: {r}", file=sys.stderr)
        load_after = os.getloadavg()
        same = {w: shard_hashes(root / f"odatasets{w}-0") == shard_hashes(root / f"ojsonl{w}-0")
                for w in workers} if args.datasets else {}

    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in results.items()}
    first = med[rows[0]]
    text_mb = first["text_mb"]
    print(
        f"corpus: {text_mb:.1f} MB of text, {first['tokens']:,.0f} tokens "
        f"({text_mb * 1e6 / first['tokens']:.2f} bytes/token), 4 domains, "
        f"vocab {args.vocab_size}; --memory-mb {args.memory_mb:g}"
    )
    print(
        f"machine: {available_cpus()} CPUs, {platform.python_version()}, load average "
        f"(1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after; {args.repeats} run(s) each, medians"
    )
    print()
    print(
        "| reader | workers | wall s | CPU s | cores used | read+clean MB/s | encode MB/s | overall MB/s "
        "| peak anon MB | baseline MB | growth MB | growth / cap | growth / corpus |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for reader, w in rows:
        m = med[reader, w]
        b = statistics.median(base[reader, w])
        growth = m["peak_mb"] - b
        print(
            f"| {reader} | {w} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['cpu_s'] / m['wall_s']:.2f} "
            f"| {m['read_mbs']:.1f} | {m['encode_mbs']:.2f} "
            f"| {text_mb / m['wall_s']:.2f} | {m['peak_mb']:.0f} | {b:.0f} | {growth:.1f} "
            f"| {growth / args.memory_mb:.2f} | {growth / text_mb:.3f} |"
        )
    if len(workers) > 1:
        w0, w1 = workers[0], workers[-1]
        print()
        print(
            f"encode throughput ratio {w1} vs {w0} workers: "
            f"{med['jsonl', w1]['encode_mbs'] / med['jsonl', w0]['encode_mbs']:.2f}x; overall (wall) "
            f"{med['jsonl', w0]['wall_s'] / med['jsonl', w1]['wall_s']:.2f}x"
        )
    for w in workers if args.datasets else ():
        print()
        print(
            f"datasets vs jsonl reader, {w} worker(s): wall {med['datasets', w]['wall_s'] / med['jsonl', w]['wall_s']:.2f}x, "
            f"read+clean {med['datasets', w]['read_mbs'] / med['jsonl', w]['read_mbs']:.2f}x; "
            f"shards byte-identical: {'yes' if same[w] else 'NO'}"
        )
    return 0 if all(same.values()) else 1


def save_as_datasets(src: Path, out: Path, domains: tuple[str, ...]) -> None:
    """Each domain's jsonl files of ``src`` as one ``Dataset.save_to_disk`` folder ``out/DOMAIN``
    (rows in file order, so the documents are the plain reader's, in its order)."""
    import datasets

    datasets.disable_progress_bars()
    for d in domains:
        files = sorted(str(p) for p in (src / d).glob("*.jsonl"))
        datasets.Dataset.from_json(files, cache_dir=str(out.parent / "hf-cache")).save_to_disk(str(out / d))


def shard_hashes(data_dir: Path) -> dict[str, list[str]]:
    """domain/split -> the sha256 of each shard, from a data dir's manifest."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {f"{d['name']}/{s}": [sh["sha256"] for sh in sp["shards"]]
            for d in manifest["domains"] for s, sp in d["splits"].items()}


if __name__ == "__main__":
    sys.exit(main())
