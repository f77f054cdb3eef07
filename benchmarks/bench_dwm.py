"""The DWM benchmark: per-sample weighting (the Data Weighting Model) on the built-in corpus.

Parts (``--parts a,b,c,d,e``; run in the order a, b, d, c, e):

a. clean data: uniform (stratified, no weighting) vs DWM vs DWM + ODM, over seeds;
b. corrupted data: a copy of the data dir in which a stated fraction (``--fraction``) of each
   domain's *train* tokens is corrupted, whole documents at a time (half of them: tokens shuffled
   within the document; the other half: replaced by the tokens of a document of another domain),
   val/test untouched; the same three methods, plus DWM reading the LM's loss (``use_loss``);
   and tokens-only DWM with 10x the default weighting.options.lr;
   the final weighting models are scored on held-out clean vs shuffled windows (AUC) and on
   labelled training windows (mean weight of clean / shuffled / swapped windows);
c. transfer: the weighting model of each (b) DWM run, frozen, weights the batches of an LM
   ~4x bigger, against that LM trained uniformly (same corrupted data, same seed);
d. wall time of DWM runs over plain runs at equal steps: the (a)/(b) runs (run one after the
   other in this process, seed by seed) and extra interleaved pairs with ``method = 'fd'``;
e. DSIR-selected data with and without DWM: ``mixlab.offline.select`` keeps ``--select-fraction``
   of the corrupted copy's train pieces (b) against a target made of the clean validation
   documents of every domain ("pooled"), and the same fraction within each domain against that
   domain's clean validation documents ("per-domain"); on each selection, uniform vs DWM (as in
   b, also ``use_loss``), against the uniform runs of (b) on the whole corrupted pool (same
   seeds); the share of corrupted pieces in each selection.

Every run validates against the clean val split (``weighting.options.validation = 'val'``). Prints
Markdown tables; ``OUT/results.json`` holds every number (the parts of earlier invocations are
kept). Finished runs are reused.

    python benchmarks/bench_dwm.py [--seeds 3] [--steps 500] [--fraction 0.3] [--parts a,b,c,d,e]
                                   [--out-dir data/bench-dwm] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.data.format import (
    MANIFEST,
    TOKENIZER,
    DataDir,
    DomainInfo,
    Manifest,
    ShardWriter,
    atomic_dir,
    open_if_current,
    write_json_atomic,
)


def _reexec_with_malloc_env() -> None:
    """Run under the glibc settings the ``mixlab`` command uses (see ``mixlab.orchestrate.launch.MALLOC_ENV``)."""
    from mixlab.orchestrate.launch import MALLOC_ENV

    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


CORRUPTION_FORMAT = 1
MIXER = "odm"  # the only significant result of benchmarks/results/groups.md, at ~1.0x wall time


# ----------------------------------------------------------------------------- the corrupted copy


def write_corrupted(src_dir: Path, out: Path, fraction: float, seed: int = 0) -> Path:
    """A copy of ``src_dir`` whose train splits have ``fraction`` of their tokens corrupted.

    Per domain, documents are taken in a seeded random order and corrupted until their tokens
    reach ``fraction`` of the split's tokens; they alternate between 'shuffle' (tokens permuted
    within the document, EOS kept last) and 'swap' (the document's tokens replaced by those of a
    random train document of another domain, cut or repeated to the same length). Val and test
    splits are copied unchanged. The manifest's ``extra.corrupted`` lists what was done.
    """

    src = DataDir.open(src_dir)
    digest = hashlib.sha256(
        json.dumps([CORRUPTION_FORMAT, src.manifest.inputs_hash, src.manifest.tokenizer_sha256,
                    fraction, seed]).encode()
    ).hexdigest()
    if open_if_current(out, digest) is not None:
        return out
    rng = np.random.default_rng([seed, 77])
    names = src.domains
    dtype = np.dtype(src.manifest.dtype)
    infos, record = [], {}
    with atomic_dir(out) as root:
        shutil.copy(src.root / TOKENIZER, root / TOKENIZER)
        for d, name in enumerate(names):
            info = src.manifest.domain(name)
            train = src.split(name, "train")
            lengths = np.array([len(train.document(j)) for j in range(train.n_docs)])
            order = rng.permutation(train.n_docs)
            chosen = order[: int(np.searchsorted(np.cumsum(lengths[order]), fraction * lengths.sum())) + 1]
            kind = {int(j): ("shuffle" if i % 2 == 0 else "swap") for i, j in enumerate(chosen)}
            w = ShardWriter(root, name, "train", dtype)
            for j in range(train.n_docs):
                doc = train.document(j)
                k = kind.get(j)
                if k == "shuffle":
                    doc = np.concatenate([rng.permutation(doc[:-1]), doc[-1:]])
                elif k == "swap":
                    other = names[int(rng.choice([e for e in range(len(names)) if e != d]))]
                    osplit = src.split(other, "train")
                    body = osplit.document(int(rng.integers(osplit.n_docs)))[:-1]
                    reps = -(-(len(doc) - 1) // max(1, len(body)))
                    doc = np.concatenate([np.tile(body, reps)[: len(doc) - 1], doc[-1:]])
                w.add(doc)
            splits = {"train": w.close()}
            for s in ("val", "test"):
                splits[s] = info.splits[s]
                for sh in info.splits[s].shards:
                    for rel in (sh.bin, sh.idx):
                        (root / rel).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(src.root / rel, root / rel)
            infos.append(DomainInfo(name=name, splits=splits, source=info.source, bytes=info.bytes,
                                    replaced_chars=info.replaced_chars, dropped_docs=info.dropped_docs))
            n_tok = {k2: int(sum(lengths[j] for j, v in kind.items() if v == k2)) for k2 in ("shuffle", "swap")}
            record[name] = {
                "docs": int(train.n_docs), "tokens": int(lengths.sum()),
                "shuffled_docs": sorted(j for j, v in kind.items() if v == "shuffle"),
                "swapped_docs": sorted(j for j, v in kind.items() if v == "swap"),
                "shuffled_tokens": n_tok["shuffle"], "swapped_tokens": n_tok["swap"],
            }
        m = src.manifest
        manifest = Manifest(
            domains=infos, vocab_size=m.vocab_size, eos_id=m.eos_id, dtype=m.dtype,
            tokenizer_sha256=m.tokenizer_sha256, created_by="benchmarks/bench_dwm.py",
            command=f"bench_dwm.write_corrupted({str(src_dir)!r}, fraction={fraction}, seed={seed})",
            source=m.source, inputs_hash=digest, seed=seed,
            extra={"corrupted": {"fraction": fraction, "from": str(src_dir), "domains": record}},
        )
        write_json_atomic(root / MANIFEST, manifest.to_json())
    return out


def write_val_target(src_dir: Path, out: Path) -> Path:
    """A data dir (same tokenizer) whose *train* split is the clean validation documents of
    every domain of ``src_dir``: the DSIR target of part (e) (``mixlab select`` reads a target
    data dir's train documents). Val/test are the same clean val/test documents."""

    src = DataDir.open(src_dir)
    digest = hashlib.sha256(json.dumps(["val-target", 1, src.manifest.inputs_hash]).encode()).hexdigest()
    if open_if_current(out, digest) is not None:
        return out
    dtype = np.dtype(src.manifest.dtype)
    infos = []
    with atomic_dir(out) as root:
        shutil.copy(src.root / TOKENIZER, root / TOKENIZER)
        for name in src.domains:
            splits = {}
            for dst, s in (("train", "val"), ("val", "val"), ("test", "test")):
                sp = src.split(name, s)
                w = ShardWriter(root, name, dst, dtype)
                for j in range(sp.n_docs):
                    w.add(sp.document(j))
                splits[dst] = w.close()
            infos.append(DomainInfo(name=name, splits=splits, source=f"val documents of {src_dir}"))
        m = src.manifest
        manifest = Manifest(
            domains=infos, vocab_size=m.vocab_size, eos_id=m.eos_id, dtype=m.dtype,
            tokenizer_sha256=m.tokenizer_sha256, created_by="benchmarks/bench_dwm.py",
            command=f"bench_dwm.write_val_target({str(src_dir)!r})", source=m.source,
            inputs_hash=digest, seed=0,
        )
        write_json_atomic(root / MANIFEST, manifest.to_json())
    return out


def selection_stats(corrupt_dir: Path, sel_dir: Path, chunk_tokens: int) -> dict[str, Any]:
    """Clean / shuffled / swapped train pieces and tokens of the pool (the corrupted copy, cut
    into pieces as ``mixlab select`` cuts it) and of its DSIR selection (``dsir/selected.npy``),
    by the corrupted copy's record of which documents it corrupted."""
    from mixlab.data.cluster import build_units

    data = DataDir.open(corrupt_dir)
    rec = data.manifest.extra["corrupted"]["domains"]
    kinds, lengths = [], []
    for name in data.domains:
        sp = data.split(name, "train")
        k = np.zeros(sp.n_docs, dtype=np.int64)
        k[rec[name]["shuffled_docs"]] = 1
        k[rec[name]["swapped_docs"]] = 2
        kinds.append(k)
        lengths.append(np.array([len(sp.document(j)) for j in range(sp.n_docs)]))
    u = build_units(lengths, chunk_tokens)
    pool_kind = np.array([kinds[d][j] for d, j in zip(u.domain.tolist(), u.doc.tolist())])
    sel = np.load(Path(sel_dir) / "dsir" / "selected.npy")  # [k, 4]: domain, doc, start, end
    sel_kind = np.array([kinds[d][j] for d, j in zip(sel[:, 0].tolist(), sel[:, 1].tolist())])
    sel_tok = sel[:, 3] - sel[:, 2]
    pool_tok = u.end - u.start
    out: dict[str, Any] = {"pool_pieces": u.n, "selected_pieces": len(sel)}
    for k, name in enumerate(("clean", "shuffled", "swapped")):
        out[f"pool_{name}_pieces"] = int((pool_kind == k).sum())
        out[f"selected_{name}_pieces"] = int((sel_kind == k).sum())
        out[f"pool_{name}_tokens"] = int(pool_tok[pool_kind == k].sum())
        out[f"selected_{name}_tokens"] = int(sel_tok[sel_kind == k].sum())
        out[f"kept_share_of_{name}_pieces"] = out[f"selected_{name}_pieces"] / max(1, out[f"pool_{name}_pieces"])
    out["selected_pieces_per_domain"] = {
        name: int((sel[:, 0] == d).sum()) for d, name in enumerate(data.domains)}
    out["selected_corrupted_share_per_domain"] = {
        name: float((sel_kind[sel[:, 0] == d] > 0).mean()) for d, name in enumerate(data.domains)
        if (sel[:, 0] == d).any()}
    return out


def window_labels(data_dir: Path, domain: str, length: int) -> np.ndarray:
    """Label of each train window of ``domain`` in a corrupted copy: 0 clean, 1 shuffled,
    2 swapped, -1 straddles a corrupted document's boundary."""

    data = DataDir.open(data_dir)
    rec = data.manifest.extra["corrupted"]["domains"][domain]
    split = data.split(domain, "train")
    offsets = split.offsets(0)
    kind = np.zeros(split.n_docs, dtype=np.int64)
    kind[rec["shuffled_docs"]] = 1
    kind[rec["swapped_docs"]] = 2
    n = split.n_windows(length)
    start = np.arange(n) * length
    first = np.searchsorted(offsets, start, side="right") - 1
    last = np.searchsorted(offsets, start + length - 1, side="right") - 1
    lab = kind[first].copy()
    lab[(first != last) & ((kind[first] != 0) | (kind[last] != 0))] = -1
    return lab


# ----------------------------------------------------------------------------- runs


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "data.seq_len=128", "model.kind='gpt'", "model.n_layer=2", "model.n_head=2",
        "model.d_model=64", "optim.lr=3e-3", "optim.warmup_steps=50", "train.batch_size=16",
        f"train.steps={args.steps}", "train.threads=1", "train.progress=false",
        "train.log_every=50", "eval.every=0", f"eval.windows={args.eval_windows}",
        "eval.signal_windows=8", f"eval.test_windows={args.test_windows}", "eval.batch_size=64",
        "checkpoint.every=0",
    ]


def dwm_overrides(args: argparse.Namespace, *extra: str) -> list[str]:
    return ["weighting.name='dwm'", f"weighting.options.stages={args.stages}",
            f"weighting.options.updates_per_stage={args.updates}", "weighting.options.validation='val'",
            "weighting.options.method='jvp'", *extra]


METHODS: dict[str, list[str]] = {
    "uniform": [],
    "dwm": ["DWM"],
    "dwm_loss": ["DWM", "weighting.options.use_loss=true"],
    "dwm_lr0.03": ["DWM", "weighting.options.lr=0.03"],
    f"dwm+{MIXER}": ["DWM", f"mixer.name='{MIXER}'"],
}


def method_overrides(args: argparse.Namespace, method: str) -> list[str]:
    spec = METHODS[method]
    if spec and spec[0] == "DWM":
        return dwm_overrides(args, *spec[1:])
    return list(spec)


def run(data_dir: Path, out: Path, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train one run (or read a finished one) and return its summary."""
    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(None, [f"data.dir='{data_dir}'", *base_overrides(args), *overrides])
    if out.exists():
        shutil.rmtree(out)  # a half-finished run: start it again (its wall time must be whole)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train(cfg, out, log=lambda _msg: None)
    # Process CPU time: on a shared machine much less sensitive to other work than wall time.
    (out / "bench_time.json").write_text(json.dumps(
        {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
    print(f"  {out} {time.perf_counter() - t0:.1f} s  val {summary['val']['avg_loss']:.4f} "
          f"test {summary['test']['avg_loss']:.4f}", file=sys.stderr, flush=True)
    return summary


def compare_part(data_dir: Path, out: Path, methods: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every method for every seed, seed by seed (so the runs of a seed are side by side)."""
    res: dict[str, Any] = {m: [] for m in methods}
    for seed in range(args.seeds):
        for m in methods:
            s = run(data_dir, out / m / f"s{seed}", [f"train.seed={seed}", *method_overrides(args, m)], args)
            res[m].append({"seed": seed, "val": s["val"]["avg_loss"], "test": s["test"]["avg_loss"],
                           "wall": s["wall_time_s"], "weighting": s.get("weighting"),
                           "run": str(out / m / f"s{seed}"), "parameters": s["parameters"]})
    return res


# ----------------------------------------------------------------------------- weighting analysis


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative); ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def score(run_dir: Path, data_dir: Path, tokens: np.ndarray, group: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Scores and weights (``batch_weights`` within consecutive groups of ``group``, as in training)
    of the final weighting model of ``run_dir`` on windows ``tokens`` [n, T+1]; the LM's loss,
    when the model reads it, is that of the run's final LM, standardised within the groups."""
    import torch

    from mixlab.errors import CheckpointError
    from mixlab.model import per_sample_loss
    from mixlab.train.loop import load_run_model
    from mixlab.weighting import MODEL_FILE, batch_weights, load_net
    from mixlab.weighting.model import standardise

    data = DataDir.open(data_dir)
    try:
        net, _ = load_net(run_dir, data.manifest.tokenizer_sha256, data.domains)
    except CheckpointError:
        net = _load_net_without_head_bias(run_dir / MODEL_FILE)
    net.eval()
    n = len(tokens) - len(tokens) % group
    x = torch.from_numpy(tokens[:n].astype(np.int64))
    with torch.no_grad():
        losses = None
        if net.spec.use_loss:
            lm = load_run_model(run_dir).eval()
            raw = torch.cat([per_sample_loss(lm, x[i : i + 256]) for i in range(0, n, 256)])
            losses = standardise(raw, group)
        s = net(x[:, :-1], losses=losses)
        w = batch_weights(s, 1.0, group)
    return s.numpy(), w.numpy()


def _load_net_without_head_bias(path: Path) -> Any:
    """Read a weighting model saved while the network's head still had a bias (mixlab's
    weighting code before 2026-11-27 10:13), which ``load_net`` now refuses. The bias adds the
    same number to every score, so dropping it changes neither the weights nor any ranking."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mixlab.weighting.model import NetSpec, WeightingNet

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "head.bias"}
    net = WeightingNet(NetSpec(**json.loads(meta["spec"])))
    net.load_state_dict(tensors)
    return net


def analyse(run_dir: Path, data_dir: Path, seq: int, n_per_domain: int, seed: int) -> dict[str, float]:
    """AUC of clean over shuffled held-out (test) windows, and mean weight of labelled train
    windows (clean / shuffled / swapped) in random batches of 16 of all five domains."""

    data = DataDir.open(data_dir)
    rng = np.random.default_rng([seed, 5])
    clean, shuffled = [], []
    for d in data.domains:
        split = data.split(d, "test")
        idx = rng.choice(split.n_windows(seq + 1), size=min(2 * n_per_domain, split.n_windows(seq + 1)), replace=False)
        w = split.windows(idx, seq + 1)
        half = len(w) // 2
        clean.append(w[:half])
        shuffled.append(np.stack([rng.permutation(r) for r in w[half:]]))
    c, sh = np.concatenate(clean), np.concatenate(shuffled)
    both = np.concatenate([c, sh])
    keep = rng.permutation(len(both))  # mixed groups of 16, as a training batch would be
    keep = keep[: len(keep) - len(keep) % 16]
    s, _ = score(run_dir, data_dir, both[keep])
    is_clean = keep < len(c)
    out: dict[str, float] = {"auc_heldout_clean_vs_shuffled": auc(s[is_clean], s[~is_clean])}
    # Labelled train windows.
    toks, labs = [], []
    for d in data.domains:
        lab = window_labels(data_dir, d, seq + 1)
        idx = rng.choice(len(lab), size=min(4 * n_per_domain, len(lab)), replace=False)
        idx = idx[lab[idx] >= 0]
        toks.append(data.split(d, "train").windows(idx, seq + 1))
        labs.append(lab[idx])
    t, lab = np.concatenate(toks), np.concatenate(labs)
    keep = rng.permutation(len(t))
    keep = keep[: len(keep) - len(keep) % 16]
    t, lab = t[keep], lab[keep]
    s, w = score(run_dir, data_dir, t)
    for k, name in enumerate(("clean", "shuffled", "swapped")):
        out[f"mean_weight_{name}"] = float(w[lab == k].mean())
    out["auc_train_clean_vs_shuffled"] = auc(s[lab == 0], s[lab == 1])
    out["auc_train_clean_vs_swapped"] = auc(s[lab == 0], s[lab == 2])
    return out


# ----------------------------------------------------------------------------- tables


def ms(xs: list[float], fmt: str = ".4f") -> str:
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt}}"


def paired(xs: list[float]) -> str:
    """Mean ± std of paired differences, '(noise)' when |mean| <= 2 standard errors."""
    if not xs:
        return "—"
    mean = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    noise = len(xs) < 2 or abs(mean) <= 2 * sd / len(xs) ** 0.5
    return f"{mean:+.4f} ± {sd:.4f}{' (noise)' if noise else ''}"


def compare_table(res: dict[str, Any], base: str = "uniform", label: str = "uniform") -> list[str]:
    lines = [f"| method | val avg loss | test avg loss | Δ val vs {label} (paired) | Δ test vs {label} (paired) "
             f"| Δ test per seed | seeds better (test) | wall time vs {label} |", "|---|---|---|---|---|---|---|---|"]
    b = {r["seed"]: r for r in res[base]}
    for m, rows in res.items():
        vals = [r["val"] for r in rows]
        tests = [r["test"] for r in rows]
        if m == base:
            lines.append(f"| **{m}** | {ms(vals)} | {ms(tests)} | baseline | baseline | — | — | 1.000 |")
            continue
        dv = [r["val"] - b[r["seed"]]["val"] for r in rows if r["seed"] in b]
        dt = [r["test"] - b[r["seed"]]["test"] for r in rows if r["seed"] in b]
        ratio = [r["wall"] / b[r["seed"]]["wall"] for r in rows if r["seed"] in b]
        better = sum(x < 0 for x in dt)
        per_seed = ", ".join(f"{x:+.3f}" for x in dt)
        lines.append(f"| {m} | {ms(vals)} | {ms(tests)} | {paired(dv)} | {paired(dt)} | {per_seed} | {better}/{len(dt)} "
                     f"| {statistics.mean(ratio):.3f} |")
    return lines


def stage_lines(run_dir: Path) -> list[str]:
    dwm = json.loads((run_dir / "dwm.json").read_text())
    doms = dwm["domains"]
    lines = ["| stage | steps | " + " | ".join(doms) + " | lowest-weighted snippet (weight, domain) |",
             "|---|---|" + "---|" * len(doms) + "---|"]
    for st in dwm["stages"]:
        low = st["lowest"][0] if st["lowest"] else None
        snip = ("—" if low is None else
                f"{low['weight']:.2f}, {low['domain']}: `{low['text'][:50]!r}`".replace("|", "\\|"))
        mw = " | ".join(f"{st['mean_weight'][d]:.3f}" if st["mean_weight"][d] is not None else "—" for d in doms)
        lines.append(f"| {st['stage']} | {st['steps'][0]}–{st['steps'][1]} | {mw} | {snip} |")
    return lines


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: 1 seed, 40 steps, small evals")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--fraction", type=float, default=0.3, help="fraction of train tokens corrupted (b, c)")
    ap.add_argument("--parts", default="a,b,c,d,e")
    ap.add_argument("--out-dir", default="data/bench-dwm")
    ap.add_argument("--stages", type=int, default=5)
    ap.add_argument("--updates", type=int, default=10, help="weighting.options.updates_per_stage")
    ap.add_argument("--big", default="128,3,4", help="d_model,n_layer,n_head of the LM of part c")
    ap.add_argument("--transfer-seeds", type=int, default=2)
    ap.add_argument("--transfer-from", default="dwm_loss", help="part c: (b) methods whose DWM is transferred, comma-separated")
    ap.add_argument("--timing-pairs", type=int, default=2, help="part d: extra plain/DWM-fd pairs")
    ap.add_argument("--cpu-pairs", type=int, default=1,
                    help="part d: plain/DWM-jvp/DWM-fd triples timed in process CPU time")
    ap.add_argument("--no-loss-variant", action="store_true", help="part b: skip DWM with use_loss")
    ap.add_argument("--no-lr-variant", action="store_true",
                    help="part b: skip tokens-only DWM with 10x the default weighting.options.lr (0.03)")
    ap.add_argument("--select-fraction", type=float, default=0.7,
                    help="part e: share of the corrupted pool's train pieces DSIR keeps")
    ap.add_argument("--select-methods", default="uniform,dwm,dwm_loss",
                    help="part e: methods trained on the DSIR selection, comma-separated")
    ap.add_argument("--per-domain-methods", default="uniform,dwm,dwm_loss",
                    help="part e: methods trained on the per-domain DSIR selection ('' = skip it)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--test-windows", type=int, default=128)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.transfer_seeds, args.timing_pairs = 1, 40, 1, 1
        args.stages, args.updates, args.eval_windows, args.test_windows = 2, 3, 8, 8
    parts = set(args.parts.split(","))
    _reexec_with_malloc_env()

    from mixlab.data.prepare import PrepareConfig, prepare
    from mixlab.orchestrate.demo import cache_dir

    t_start = time.perf_counter()
    out = Path(args.out_dir) / ("quick" if args.quick else f"steps{args.steps}")
    out.mkdir(parents=True, exist_ok=True)
    clean_dir = cache_dir() / "builtin-v2048"
    prepare(PrepareConfig(source="builtin", out=str(clean_dir), vocab_size=2048))
    corrupt_dir = Path(args.out_dir) / f"data-corrupt-f{args.fraction:g}"
    results: dict[str, Any] = {}
    if (out / "results.json").is_file():  # keep the parts of earlier invocations
        results = json.loads((out / "results.json").read_text())
    results["args"] = vars(args)
    md: list[str] = []
    say = lambda t: print(f"[bench_dwm] {t}", file=sys.stderr, flush=True)  # noqa: E731

    md.append(f"Settings: d64/L2 GPT, vocab 2048, batch 16 x 128 tokens, {args.steps} steps, seeds "
              f"0-{args.seeds - 1}; DWM: {args.stages} stages x {args.updates} bi-level updates "
              f"(jvp, validation = clean val split); mixer of 'dwm+{MIXER}': {MIXER}. Cells: mean ± std "
              "over seeds of average (over 5 domains) loss in nats; Δ = paired difference per seed, "
              "'(noise)' when |mean| <= 2 standard errors.\n")

    if "a" in parts:
        say("part a: clean data")
        res = compare_part(clean_dir, out / "a", ["uniform", "dwm", f"dwm+{MIXER}"], args)
        results["a"] = res
        md += ["### (a) clean data", "", *compare_table(res), ""]

    if parts & {"b", "c", "e"}:
        write_corrupted(clean_dir, corrupt_dir, args.fraction)
        rec = DataDir.open(corrupt_dir).manifest.extra["corrupted"]["domains"]
        tot = sum(r["tokens"] for r in rec.values())
        sh = sum(r["shuffled_tokens"] for r in rec.values())
        sw = sum(r["swapped_tokens"] for r in rec.values())
        docs = sum(r["docs"] for r in rec.values())
        cd = sum(len(r["shuffled_docs"]) + len(r["swapped_docs"]) for r in rec.values())
        results["corruption"] = {"tokens": tot, "shuffled_tokens": sh, "swapped_tokens": sw,
                                 "docs": docs, "corrupted_docs": cd,
                                 "per_domain": {d: (r["shuffled_tokens"] + r["swapped_tokens"]) / r["tokens"]
                                                for d, r in rec.items()}}
        md.append(f"Corrupted copy `{corrupt_dir}`: {cd}/{docs} train documents, {(sh + sw) / tot:.1%} of "
                  f"train tokens ({sh / tot:.1%} shuffled, {sw / tot:.1%} swapped); per domain: "
                  + ", ".join(f"{d} {v:.1%}" for d, v in results["corruption"]["per_domain"].items())
                  + ". Val/test clean.\n")

    if "b" in parts:
        say("part b: corrupted data")
        methods = ["uniform", "dwm", f"dwm+{MIXER}"] + ([] if args.no_loss_variant else ["dwm_loss"])
        methods += [] if args.no_lr_variant else ["dwm_lr0.03"]
        res = compare_part(corrupt_dir, out / "b", methods, args)
        results["b"] = res
        md += [f"### (b) {args.fraction:.0%} of train tokens corrupted, clean validation", "",
               *compare_table(res), ""]
        md += ["Final weighting models on labelled windows (train windows: mean weight within random "
               "batches of 16; AUC = P(clean scored above corrupted)):", "",
               "| method | seed | held-out AUC clean > shuffled | train AUC clean > shuffled | train AUC clean > swapped "
               "| mean weight clean | shuffled | swapped |", "|---|---|---|---|---|---|---|---|"]
        for m in methods[1:]:
            for r in res[m]:
                a = analyse(Path(r["run"]), corrupt_dir, 128, 16 if args.quick else 200, r["seed"])
                r["analysis"] = a
                md.append(f"| {m} | {r['seed']} | {a['auc_heldout_clean_vs_shuffled']:.3f} "
                          f"| {a['auc_train_clean_vs_shuffled']:.3f} | {a['auc_train_clean_vs_swapped']:.3f} "
                          f"| {a['mean_weight_clean']:.3f} | {a['mean_weight_shuffled']:.3f} "
                          f"| {a['mean_weight_swapped']:.3f} |")
        for m in [k for k in ("dwm", "dwm_loss") if k in res]:
            md += ["", f"{m}, per stage, from `{res[m][0]['run']}/dwm.json` (mean weight per domain over "
                   "the stage's training batches; the lowest-weighted sample of the stage):", "",
                   *stage_lines(Path(res[m][0]["run"]))]
        md.append("")

    if "d" in parts:
        say("part d: wall time")
        lines = ["| runs | settings | pairs | DWM wall ÷ plain wall (per pair) | mean |", "|---|---|---|---|---|"]
        for part in ("a", "b"):
            if part not in results:
                continue
            for m in [k for k in results[part] if k != "uniform"]:
                rs = [r["wall"] / results[part]["uniform"][r["seed"]]["wall"] for r in results[part][m]]
                lines.append(f"| ({part}) {m} vs uniform | jvp, {args.stages} x {args.updates} updates, "
                             f"{args.steps} steps | {len(rs)} | {', '.join(f'{x:.3f}' for x in rs)} "
                             f"| {statistics.mean(rs):.3f} |")
        rs = []
        for i in range(args.timing_pairs):
            seed = 100 + i
            order = [("plain", []), ("fd", dwm_overrides(args, "weighting.options.method='fd'"))]
            if i % 2:
                order.reverse()
            wall = {}
            for tag, extra in order:
                s = run(clean_dir, out / "d" / tag / f"s{seed}", [f"train.seed={seed}", *extra], args)
                wall[tag] = s["wall_time_s"]
            rs.append(wall["fd"] / wall["plain"])
        if rs:
            lines.append(f"| (d) DWM-fd vs plain, clean data, interleaved | fd, {args.stages} x {args.updates} "
                         f"updates, {args.steps} steps | {len(rs)} | {', '.join(f'{x:.3f}' for x in rs)} "
                         f"| {statistics.mean(rs):.3f} |")
        # The same comparison in process CPU time (1 thread): plain, DWM-jvp, DWM-fd side by side.
        cpu: dict[str, list[float]] = {"jvp": [], "fd": []}
        for i in range(args.cpu_pairs):
            seed = 200 + i
            times = {}
            for tag, extra in (("plain", []), ("jvp", dwm_overrides(args)),
                               ("fd", dwm_overrides(args, "weighting.options.method='fd'")))[:: 1 if i % 2 == 0 else -1]:
                d_out = out / "d_cpu" / tag / f"s{seed}"
                run(clean_dir, d_out, [f"train.seed={seed}", *extra], args)
                times[tag] = json.loads((d_out / "bench_time.json").read_text())["cpu_s"]
            for k in cpu:
                cpu[k].append(times[k] / times["plain"])
        for k, xs in cpu.items():
            if xs:
                lines.append(f"| (d) DWM-{k} vs plain, clean data, **process CPU time** | {k}, {args.stages} x "
                             f"{args.updates} updates, {args.steps} steps | {len(xs)} "
                             f"| {', '.join(f'{x:.3f}' for x in xs)} | {statistics.mean(xs):.3f} |")
        results["d"] = {"wall_fd": rs, "cpu": cpu}
        md += ["### (d) wall time of DWM runs over plain runs at equal steps", "", *lines, ""]

    if "c" in parts:
        say("part c: transfer to a bigger LM")
        d, n_layer, n_head = (int(x) for x in args.big.split(","))
        big = [f"model.d_model={d}", f"model.n_layer={n_layer}", f"model.n_head={n_head}"]
        sources = args.transfer_from.split(",")
        rows: dict[str, list[dict[str, Any]]] = {"uniform": [], **{f"frozen {m} from small": [] for m in sources}}
        # Controls: is the gain transfer, or a trained filter applied from step 0? The big LM
        # with its own in-run model, and the small LM with the frozen model from step 0.
        controls: dict[str, list[dict[str, Any]]] = {
            "small uniform (b)": [], **{f"small + frozen {m} (its own, from step 0)": [] for m in sources}}
        rows.update({f"big + in-run {m}": [] for m in sources})
        small_params = None
        for seed in range(args.transfer_seeds):
            variants: list[tuple[str, str, list[str]]] = [("uniform", "uniform", [])]
            for m in sources:
                src = out / "b" / m / f"s{seed}"
                s_small = run(corrupt_dir, src, [f"train.seed={seed}", *method_overrides(args, m)], args)
                small_params = s_small["parameters"]
                variants.append((f"frozen {m} from small", f"frozen_{m}", [
                    "weighting.name='dwm'", f"weighting.options.load='{src}'", "weighting.options.frozen=true",
                    f"weighting.options.stages={args.stages}", "weighting.options.validation='val'"]))
            variants += [(f"big + in-run {m}", f"big_{m}", method_overrides(args, m)) for m in sources]
            for name, tag, extra in variants:
                s = run(corrupt_dir, out / "c" / tag / f"s{seed}", [f"train.seed={seed}", *big, *extra], args)
                rows[name].append({"seed": seed, "val": s["val"]["avg_loss"], "test": s["test"]["avg_loss"],
                                   "wall": s["wall_time_s"], "parameters": s["parameters"]})
            s = run(corrupt_dir, out / "b" / "uniform" / f"s{seed}", [f"train.seed={seed}"], args)
            controls["small uniform (b)"].append(
                {"seed": seed, "val": s["val"]["avg_loss"], "test": s["test"]["avg_loss"], "wall": s["wall_time_s"]})
            for m in sources:
                src = out / "b" / m / f"s{seed}"
                s = run(corrupt_dir, out / "c" / f"small_frozen_{m}" / f"s{seed}", [
                    f"train.seed={seed}", "weighting.name='dwm'", f"weighting.options.load='{src}'",
                    "weighting.options.frozen=true", f"weighting.options.stages={args.stages}", "weighting.options.validation='val'"], args)
                controls[f"small + frozen {m} (its own, from step 0)"].append(
                    {"seed": seed, "val": s["val"]["avg_loss"], "test": s["test"]["avg_loss"], "wall": s["wall_time_s"]})
        results["c"] = rows
        results["c_controls"] = controls
        bp = rows["uniform"][0]["parameters"]
        md += [f"### (c) transfer: weighting model trained with the {small_params:,}-parameter LM in (b), "
               f"frozen, for a {bp:,}-parameter LM (d{d}/L{n_layer}, {bp / small_params:.1f}x), corrupted "
               "data; 'uniform' = the big LM without weighting", "", *compare_table(rows), "",
               "Control on the small LM: its own (b) weighting model, frozen, from step 0 "
               "('uniform' = part b's uniform runs of the same seeds):", "",
               *compare_table(controls, base="small uniform (b)", label="small uniform"), ""]

    if "e" in parts:
        say("part e: DSIR-selected data, with and without DWM")
        from mixlab.offline.select import SelectConfig, select

        target_dir = write_val_target(corrupt_dir, Path(args.out_dir) / "target-clean-val")
        tdata = DataDir.open(target_dir)
        tdocs = sum(tdata.split(d, "train").n_docs for d in tdata.domains)
        prev = results.get("e", {})
        pool_uniform = compare_part(corrupt_dir, out / "b", ["uniform"], args)["uniform"]
        results["e"] = {"target_dir": str(target_dir), "pool_uniform": pool_uniform}
        stem = f"data-corrupt-f{args.fraction:g}-dsir{args.select_fraction:g}"
        variants = [("pooled", Path(args.out_dir) / stem, args.select_methods.split(","), "e",
                     f"one selection over all domains (`mixlab.offline.select`, as `mixlab select --target "
                     f"{target_dir}`: target = the {tdocs} clean validation documents of all 5 domains)"),
                    ("per_domain", Path(args.out_dir) / f"{stem}-per-domain",
                     [m for m in args.per_domain_methods.split(",") if m], "e_per_domain",
                     "within each domain, against that domain's clean validation documents "
                     f"(`mixlab select --data {corrupt_dir} --target {corrupt_dir} --per-domain`)")]
        for tag, sel_dir, methods, sub, how in variants:
            if not methods:
                continue
            t0 = time.perf_counter()
            # Per domain: the pool as its own target means each domain's own val documents.
            scfg = SelectConfig(data=str(corrupt_dir), target=str(target_dir if tag == "pooled" else corrupt_dir),
                                fraction=args.select_fraction, out=str(sel_dir), per_domain=tag == "per_domain")
            msgs: list[str] = []
            select(scfg, log=lambda m, msgs=msgs: (msgs.append(m), say(m)))
            reused = any("up to date" in m for m in msgs)
            sel_s = time.perf_counter() - t0
            if reused:  # keep the time of the build
                sel_s = prev.get(tag, {}).get("selection", {}).get("select_s", sel_s)
            st = selection_stats(corrupt_dir, sel_dir, 1024)
            st["select_s"] = sel_s
            sel_res = compare_part(sel_dir, out / sub, methods, args)
            results["e"][tag] = {"selection": st, "selected_dir": str(sel_dir), **sel_res}

            def row(kind: str, st: dict[str, Any] = st) -> str:
                p, s_ = st[f"pool_{kind}_pieces"], st[f"selected_{kind}_pieces"]
                pool_tok = sum(st[f"pool_{k}_tokens"] for k in ("clean", "shuffled", "swapped"))
                sel_tok = sum(st[f"selected_{k}_tokens"] for k in ("clean", "shuffled", "swapped"))
                return (f"| {kind} | {p:,} ({p / st['pool_pieces']:.1%}) | {st[f'pool_{kind}_tokens'] / pool_tok:.1%} "
                        f"| {s_:,} ({s_ / st['selected_pieces']:.1%}) | {st[f'selected_{kind}_tokens'] / sel_tok:.1%} "
                        f"| {s_ / max(1, p):.1%} |")

            label = f"{tag.replace('_', '-')} DSIR"
            md += [f"### (e, {tag.replace('_', '-')}) DSIR selection of the corrupted pool "
                   f"({args.select_fraction:.0%} of its train pieces), {how}, with and without DWM", "",
                   f"Selection `{sel_dir}` ({sel_s:.1f} s; pieces of ≤ 1024 tokens):", "",
                   "| pieces | pool pieces | pool tokens | selected pieces | selected tokens | share of the pool's kept |",
                   "|---|---|---|---|---|---|", row("clean"), row("shuffled"), row("swapped"),
                   f"| all | {st['pool_pieces']:,} | 100% | {st['selected_pieces']:,} | 100% "
                   f"| {st['selected_pieces'] / st['pool_pieces']:.1%} |", "",
                   "Per domain, corrupted share of the selected pieces (selected pieces): "
                   + ", ".join(f"{d} {v:.1%} ({st['selected_pieces_per_domain'][d]:,})"
                               for d, v in st["selected_corrupted_share_per_domain"].items()) + ".", ""]
            both = {"uniform, full pool (b)": pool_uniform, **{f"{m}, {label}": sel_res[m] for m in methods}}
            md += ["Against uniform on the whole corrupted pool (the uniform runs of (b), same seeds):", "",
                   *compare_table(both, "uniform, full pool (b)", "pool uniform"), ""]
            doms = list(st["selected_pieces_per_domain"])
            per = {m: [json.loads((Path(r["run"]) / "summary.json").read_text())["test"]["loss"] for r in rows]
                   for m, rows in both.items()}
            md += ["Test loss per domain, mean over seeds (Δ: paired, vs pool uniform):", "",
                   "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
            for m, losses in per.items():
                cells = []
                for d in doms:
                    x = statistics.mean(v[d] for v in losses)
                    dx = statistics.mean(v[d] - b_[d] for v, b_ in zip(losses, per["uniform, full pool (b)"]))
                    cells.append(f"{x:.3f}" if m == "uniform, full pool (b)" else f"{x:.3f} ({dx:+.3f})")
                md.append(f"| {m} | " + " | ".join(cells) + " |")
            md.append("")
            if "uniform" in methods and len(methods) > 1:
                md += [f"Against uniform on the same selection ({label}):", "",
                       *compare_table({f"{m}, {label}": sel_res[m] for m in methods}, f"uniform, {label}",
                                      "selection uniform"), ""]

    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    md.append(f"Benchmark wall time: {elapsed / 60:.1f} min (runs reused from earlier invocations not counted).")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
