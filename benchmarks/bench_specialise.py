"""The "specialise" benchmark: a CPU-sized analogue of the two regimes of the DGA paper.

Fan, Grangier, Ablin, "Dynamic Gradient Alignment for Online Data Mixing" (arXiv 2410.02498):
a run specialises to a small target set by choosing, online, how much of each generic cluster
to train on. Here the generic data is the built-in corpus cut into ~64 tf-idf clusters under 8
coarse ones (``mixlab cluster``), and the target is a few *medical* documents held out from it
(the test split of the medical domain: no run ever trains on them). Two regimes:

* (i) small generic set: a 400k-token sample of the corpus' training documents (80k per
  source, cut into ~1 KB documents, re-prepared with the same tokenizer with 15% val and 15%
  test, clustered on its own: ~280k training tokens), so the run's budget repeats it several
  times and a method that concentrates on the target's clusters repeats those far more;
* (ii) tiny target set: the whole corpus (9.1M training tokens, more than the budget) and only
  4 target documents that methods may look at.

Methods: uniform (``natural``: every generic training token equally likely), clustered
importance sampling (``importance``), DGA, DGA with an EMA on the weights, and DGA with
distribution reweighting (``basis = "importance"``: weights over 8 basis distributions, one per
coarse cluster). Each (regime, seed) trains the same model with every method; the measure is
the loss on held-out target documents that no method sees (the eval part of the target set),
with the final model. Prints one Markdown table per regime: mean ± std over seeds, and the
paired difference from uniform per seed (mean ± std; "(noise)" when |mean| <= 2 std/sqrt(n)).

    python benchmarks/bench_specialise.py [--seeds 3] [--steps 700] [--out-dir runs/specialise]
    python benchmarks/bench_specialise.py --quick        # a smoke run of a few minutes

Runs go one at a time with one torch thread; finished runs are reused (an interrupted
benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.config import apply_overrides, from_dict
from mixlab.data.cluster import ClusterConfig, cluster
from mixlab.data.format import DataDir
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.orchestrate.demo import cache_dir, load_demo_config
from mixlab.train.config import TrainConfig
from mixlab.train.loop import train

TARGET_SOURCE = "medical"
TARGET_DOCS = 40
"""Target documents drawn (seeded) from the medical test split; per seed, the run splits them
into a probe part (methods) and an eval part (the reported loss) by ``target.probe_fraction``."""
DGA_COMMON = {"update_every": 10, "target_windows": 8, "align_samples": 32}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform": ("natural", {}),
    "importance": ("importance", {}),
    "dga": ("dga", dict(DGA_COMMON)),
    "dga+ema": ("dga", {**DGA_COMMON, "ema": 0.9}),
    "dga+reweighting": ("dga", {**DGA_COMMON, "basis": "importance"}),
}
BASELINE = "uniform"


def say(text: str) -> None:
    print(f"[specialise] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data: the generic data dirs and the target documents.


def decode(data: DataDir, tok: Any, domain: str, split: str, j: int) -> str:
    """The text of document ``j`` (mixlab's byte-level BPE decodes to the text it encoded)."""
    ids = data.split(domain, split).document(j)
    return tok.decode([int(t) for t in ids if t != data.eos_id])


def write_target(data: DataDir, n_docs: int, path: Path) -> list[str]:
    """``n_docs`` documents of the target source's *test* split (seeded choice) as jsonl."""
    split = data.split(TARGET_SOURCE, "test")
    pick = np.sort(np.random.default_rng([2024, 6]).permutation(split.n_docs)[:n_docs])
    tok = data.tokenizer()
    texts = [decode(data, tok, TARGET_SOURCE, "test", int(j)) for j in pick]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return texts


def pieces(text: str, max_chars: int) -> list[str]:
    """``text`` cut at line ends into pieces of at most ~``max_chars`` characters."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return out


def write_small_source(data: DataDir, tokens_per_source: int, folder: Path) -> None:
    """A folder source (one sub-folder per source domain) with about ``tokens_per_source``
    tokens of each domain's *train* documents (seeded order), cut into ~1 KB pieces: many small
    documents give every cluster some val and test text, so fewer clusters are merged away
    (with 4 KB pieces and 10% val/test, 17 of 64 clusters were kept; with these settings, 47)."""
    tok = data.tokenizer()
    for d in data.domains:
        split = data.split(d, "train")
        order = np.random.default_rng([2024, data.domains.index(d)]).permutation(split.n_docs)
        kept: list[str] = []
        total = 0
        for j in order:
            for p in pieces(decode(data, tok, d, "train", int(j)), 1000):
                kept.append(p)
                total += len(tok.encode(p).ids) + 1
                if total >= tokens_per_source:
                    break
            if total >= tokens_per_source:
                break
        (folder / d).mkdir(parents=True, exist_ok=True)
        (folder / d / "docs.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in kept), encoding="utf-8"
        )


def build_data(root: Path, small_tokens: int, k: int, coarse: int) -> tuple[DataDir, dict[str, Path]]:
    """The built-in corpus (2,048-id tokenizer), its clustering (regime ii), a small sample of
    it clustered on its own (regime i), and the target file."""
    full = prepare(PrepareConfig(source="builtin", out=str(root / "builtin-v2048"), vocab_size=2048))
    clustered = root / f"builtin-v2048-c{k}"
    cluster(ClusterConfig(data=str(full.root), out=str(clustered), k=k, coarse=coarse,
                          embedder="tfidf", min_tokens=129), log=say)
    small_src = root / f"specialise-small{small_tokens // 1000}k-src"
    if not small_src.exists():
        write_small_source(full, small_tokens, small_src)
    small = prepare(PrepareConfig(source=str(small_src), out=str(root / f"specialise-small{small_tokens // 1000}k"),
                                  tokenizer=str(full.root / "tokenizer.json"),
                                  val_fraction=0.15, test_fraction=0.15))
    small_clustered = root / f"specialise-small{small_tokens // 1000}k-c{k}"
    cluster(ClusterConfig(data=str(small.root), out=str(small_clustered), k=k, coarse=coarse,
                          embedder="tfidf", min_tokens=129), log=say)
    return full, {"i": small_clustered, "ii": clustered}


def medical_share(data: DataDir) -> np.ndarray:
    """[k] share of each cluster's training tokens that come from the target's source."""
    comp = data.manifest.extra["clusters"]
    tokens = np.asarray(comp["composition"]["train"]["tokens"], dtype=np.float64)
    col = comp["source_domains"].index(TARGET_SOURCE)
    return tokens[:, col] / np.maximum(tokens.sum(axis=1), 1)


# ---------------------------------------------------------------------------------------------
# Runs.


def run_config(data_dir: Path, target: Path, probe_fraction: float, method: str, seed: int,
               steps: int) -> TrainConfig:
    name, options = METHODS[method]
    raw = apply_overrides(load_demo_config(), [
        f"train.steps={steps}",
        f"train.seed={seed}",
        "train.threads=1",
        "train.progress=false",
        "train.log_every=20",
        "optim.warmup_steps=30",
        f"eval.every={max(1, steps // 6)}",
        "eval.windows=4",
        "eval.signal_windows=4",
        "eval.test_windows=8",
    ])
    raw.pop("demo", None)
    raw.pop("mixers", None)
    raw["data"]["dir"] = str(data_dir)
    raw["target"] = {"path": str(target), "probe_fraction": probe_fraction}
    raw["mixer"] = {"name": name, "options": options}
    return from_dict(TrainConfig, raw)


def target_curve(run_dir: Path) -> list[float]:
    """Target (eval part) loss at every validation evaluation of a run."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and rec.get("target_loss") is not None:
            out.append(float(rec["target_loss"]))
    return out


def one_run(run_dir: Path, cfg: TrainConfig, share: np.ndarray, train_tokens: np.ndarray) -> dict[str, float]:
    done = run_dir / "summary.json"
    summary = (json.loads(done.read_text(encoding="utf-8")) if done.exists()
               else train(cfg, run_dir, resume=True))
    drawn = np.array([summary["tokens_per_domain"][d] for d in summary["domains"]], dtype=np.float64)
    curve = target_curve(run_dir)
    return {
        "target": float(summary["test"]["target_loss"]),
        "best": min(curve) if curve else float("nan"),
        "generic": float(summary["test"]["avg_loss"]),
        "share": float(drawn @ share / drawn.sum()),
        "passes": float(drawn @ share / max(train_tokens @ share, 1)),
        "max_epochs": float(max(summary["epochs_per_domain"].values())),
        "wall": float(summary["wall_time_s"]),
    }


# ---------------------------------------------------------------------------------------------
# Table.


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(res: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> str:
    lines = [
        f"| method | target loss (mean ± std) | Δ vs {BASELINE} (paired, mean ± std) | better than "
        f"{BASELINE} | lowest target loss during training | generic test loss (mean over clusters) | "
        f"target-source share of training tokens | passes over the target-source tokens | max "
        f"epochs of a cluster | wall time vs {BASELINE} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = res[BASELINE]
    for m, per_seed in res.items():
        s = [x for x in seeds if x in per_seed and x in base]
        if not s:
            continue
        tl = mean_std([per_seed[x]["target"] for x in s])
        cell_diff, wins = "baseline", "—"
        if m != BASELINE:
            diffs = [per_seed[x]["target"] - base[x]["target"] for x in s]
            dm, ds = mean_std(diffs)
            noise = " (noise)" if abs(dm) <= 2 * ds / len(diffs) ** 0.5 else ""
            cell_diff = f"{dm:+.4f} ± {ds:.4f}{noise}"
            wins = f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
        best = mean_std([per_seed[x]["best"] for x in s])
        generic = statistics.mean(per_seed[x]["generic"] for x in s)
        share = statistics.mean(per_seed[x]["share"] for x in s)
        passes = statistics.mean(per_seed[x]["passes"] for x in s)
        ep = statistics.mean(per_seed[x]["max_epochs"] for x in s)
        wall = statistics.mean(per_seed[x]["wall"] / base[x]["wall"] for x in s)
        lines.append(f"| {m} | {tl[0]:.4f} ± {tl[1]:.4f} | {cell_diff} | {wins} | "
                     f"{best[0]:.4f} ± {best[1]:.4f} | {generic:.3f} | {share:.1%} | {passes:.2f} | {ep:.2f} | "
                     f"{wall:.2f}× |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    ap.add_argument("--steps", type=int, default=700, help="optimizer steps per run (default 700)")
    ap.add_argument("--small-tokens", type=int, default=80_000,
                    help="regime (i): tokens per source domain in the small generic set (default 80000)")
    ap.add_argument("--k", type=int, default=64, help="fine clusters asked for (default 64)")
    ap.add_argument("--coarse", type=int, default=8, help="coarse clusters (default 8)")
    ap.add_argument("--regimes", default="i,ii", help="comma-separated subset of i,ii")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    ap.add_argument("--data-dir", default=None, help="where the data dirs go (default $MIXLAB_CACHE or data/)")
    ap.add_argument("--out-dir", default="runs/specialise", help="run dirs (default runs/specialise)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 40 steps, into <out-dir>-quick")
    args = ap.parse_args()
    seeds = list(range(1 if args.quick else args.seeds))
    steps = 40 if args.quick else args.steps
    out = Path(args.out_dir + ("-quick" if args.quick else ""))
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    regimes = {"i": 0.5, "ii": 0.1}  # target.probe_fraction: 20 of 40 docs, or 4 of 40
    regimes = {r: f for r, f in regimes.items() if r in args.regimes.split(",")}

    root = Path(args.data_dir) if args.data_dir else cache_dir()
    t0 = time.perf_counter()
    full, dirs = build_data(root, args.small_tokens, args.k, args.coarse)
    target = out / "target.jsonl"
    texts = write_target(full, TARGET_DOCS, target)
    say(f"data ready in {time.perf_counter() - t0:.0f} s; target: {len(texts)} {TARGET_SOURCE} test documents")

    results: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    info: dict[str, str] = {}
    for r, frac in regimes.items():
        data = DataDir.open(dirs[r])
        share = medical_share(data)
        train_tokens = np.array([data.split(d, "train").n_tokens for d in data.domains], dtype=np.float64)
        info[r] = (f"{dirs[r]}: {len(data.domains)} clusters, {int(train_tokens.sum()):,} training tokens "
                   f"({int(train_tokens @ share):,} from {TARGET_SOURCE}); budget "
                   f"{steps * 16 * 128:,} tokens = {steps * 16 * 128 / train_tokens.sum():.1f} passes")
        say(f"regime ({r}): {info[r]}")
        for seed in seeds:
            for m in methods:
                cfg = run_config(dirs[r], target, frac, m, seed, steps)
                t1 = time.perf_counter()
                row = one_run(out / f"regime-{r}" / f"{m}-s{seed}", cfg, share, train_tokens)
                results.setdefault(r, {}).setdefault(m, {})[seed] = row
                say(f"({r}) {m} seed {seed}: target loss {row['target']:.4f} "
                    f"({time.perf_counter() - t1:.0f} s)")

    train_s = sum(row["wall"] for per in results.values() for runs in per.values() for row in runs.values())
    print(f"\nHeld-out target loss (nats/token on {TARGET_SOURCE} documents no method sees), "
          f"{steps} steps x 16 x 128 tokens, d64/L2 GPT, vocab 2048, seeds {seeds}; "
          f"{len(seeds) * len(methods) * len(regimes)} runs, {train_s:.0f} s of training in all "
          f"(this invocation: {time.perf_counter() - t0:.0f} s).")
    for r in regimes:
        title = {"i": "(i) small generic set, 20 probe target docs",
                 "ii": "(ii) full generic set, tiny target: 4 probe docs"}[r]
        print(f"\n### Regime {title}\n\n{info[r]}\n")
        print(table(results[r], seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
