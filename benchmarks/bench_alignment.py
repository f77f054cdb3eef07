"""The alignment engine against per-group backward loops, and the wall time of a DGA run.

(a) Engine vs loop. A ~1M-parameter GPT (d96/L3/3 heads, vocab 8192) after a few AdamW steps;
    N measurement windows split into k equal groups (k = 8, 64, 512); direction v = the
    mean-loss gradient of 16 other windows. Per-group alignments <∇ mean_group ℓ, v> by
    - loop: one forward + backward per group (only that group's samples), the exact reference;
    - published: the DoGE reference's pattern, one forward over the whole batch, then one
      backward per group through the whole graph (retain_graph); timed on a few groups and
      extrapolated to k (marked "est.");
    - jvp: the engine, one forward-mode pass over the N samples, then a group mean;
    - fd: the engine's central finite difference (two forwards), then a group mean.
    Every method sees the same N samples; errors are relative (L2 over groups) to the loop.
(b) DGA overhead. A 64-domain synthetic data dir; the same model, batch 16, T_r = 10;
    a stratified run and DGA runs (jvp and fd, each with the alignment batch size chosen to
    meet the goal) for the same number of steps, alternating in one process; the median of the
    paired ratios of run times. Goal: DGA / stratified <= 1.15.

Times are CPU seconds of this process (``time.process_time``) and wall seconds: the machine is
shared with other agents, whose load moves wall times by 2x between identical runs; with one
thread CPU time is what an idle machine's wall time would be.

    python benchmarks/bench_alignment.py [--threads 1] [--n 512] [--seq 32] [--seq-b 128]
        [--steps 40] [--repeats 2] [--jvp-samples 8] [--fd-samples 32] [--target-windows 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.model import GPT, per_sample_loss
from mixlab.signals.alignment import (
    alignments_fd,
    alignments_jvp,
    dot,
    group_alignments_backward,
    group_mean,
    loss_gradient,
    trainable_parameters,
)
from mixlab.train.config import load_config
from mixlab.train.loop import Trainer


class Timer:
    """Wall time and this process's CPU time of a block. The machine is shared by several
    agents, so wall times swing with their load; CPU time (``time.process_time``, all threads
    of this process) measures the work itself and is the robust figure with 1 thread."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


# ---------------------------------------------------------------------------------------------
# (a) engine vs loop


def published_loop(model: GPT, tokens: torch.Tensor, groups: np.ndarray, k: int, v: dict,
                   timed_groups: int) -> tuple[float, float, np.ndarray]:
    """DoGE-reference pattern: one forward of the whole batch, one backward per group through
    the whole graph. Times the forward and ``timed_groups`` backwards; returns (estimated wall
    and CPU time for all k groups, the values of the timed groups)."""
    params = list(trainable_parameters(model).values())
    names = list(trainable_parameters(model))
    model.eval()
    with Timer() as fwd:
        losses = per_sample_loss(model, tokens)
    out = np.full(k, np.nan)
    walls, cpus = [], []
    for j in range(timed_groups):
        with Timer() as t:
            rows = torch.from_numpy(np.flatnonzero(groups == j))
            grads = torch.autograd.grad(losses[rows].mean(), params, retain_graph=True)
            out[j] = dot(dict(zip(names, grads)), v)
        walls.append(t.wall)
        cpus.append(t.cpu)
    return fwd.wall + statistics.mean(walls) * k, fwd.cpu + statistics.mean(cpus) * k, out


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    ok = np.isfinite(a)
    return float(np.linalg.norm(a[ok] - ref[ok]) / np.linalg.norm(ref[ok]))


def engine_vs_loop(n: int, seq: int, ks: list[int], timed_groups: int) -> list[dict]:
    torch.manual_seed(0)
    model = GPT(8192, seq, n_layer=3, n_head=3, d_model=96)
    gen = torch.Generator().manual_seed(0)
    # Patterned-ish text: each window draws from one of 8 token bands, so groups differ.
    band = torch.randint(0, 8, (n + 16 + 64, 1), generator=gen)
    data = band * 1000 + torch.randint(0, 1000, (n + 16 + 64, seq + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for s in range(8):  # a few real steps: the loss is no longer at its initial value
        opt.zero_grad()
        per_sample_loss(model, data[n + 16 + 8 * s: n + 24 + 8 * s]).mean().backward()
        opt.step()
    tokens, target = data[:n], data[n:n + 16]
    v = loss_gradient(model, target)
    rows = []
    for k in ks:
        groups = np.arange(n) % k
        with Timer() as loop:
            ref = group_alignments_backward(model, tokens, groups, k, v)
        pub_wall, pub_cpu, pub = published_loop(model, tokens, groups, k, v, min(k, timed_groups))
        with Timer() as tj:
            jvp = group_mean(alignments_jvp(model, tokens, v, chunk_size=64).double().numpy(), groups, k)
        with Timer() as tf:
            fd = group_mean(alignments_fd(model, tokens, v, chunk_size=64).double().numpy(), groups, k)
        row = {"k": k, "per_group": n // k, "loop": loop, "published": (pub_wall, pub_cpu),
               "jvp": tj, "fd": tf, "err_jvp": rel_err(jvp, ref), "err_fd": rel_err(fd, ref),
               "err_published": rel_err(pub, ref),
               "cos_fd": float(fd @ ref / (np.linalg.norm(fd) * np.linalg.norm(ref)))}
        rows.append(row)
        print(f"  k={k}: CPU s loop {loop.cpu:.1f}, published {pub_cpu:.1f} (est.), jvp {tj.cpu:.1f}, "
              f"fd {tf.cpu:.1f}; wall s {loop.wall:.1f}, {pub_wall:.1f}, {tj.wall:.1f}, {tf.wall:.1f}",
              file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# (b) DGA overhead


def overrides(data_dir: Path, steps: int, threads: int, seq: int) -> list[str]:
    return [
        f"data.dir='{data_dir}'", f"data.seq_len={seq}", "model.d_model=96", "model.n_layer=3",
        "model.n_head=3", f"train.steps={steps}", "train.batch_size=16", "train.progress=false",
        f"train.threads={threads}", "train.log_every=10", "eval.every=0", "eval.windows=1",
        "eval.signal_windows=1", "eval.test_windows=1", "optim.warmup_steps=5",
        "target.domain='d00'", "target.docs=8",
    ]


def run(data_dir: Path, out: Path, steps: int, threads: int, seq: int, *extra: str) -> Timer:
    """Wall and CPU time of one training run (``Trainer.run``: the loop, the final evaluation
    on one window per domain and the summary, the same for every method)."""
    cfg = load_config(None, [*overrides(data_dir, steps, threads, seq), *extra])
    trainer = Trainer(cfg, out)
    with Timer() as t:
        trainer.run()
    return t


def dga_overhead(tmp: Path, steps: int, repeats: int, threads: int, seq: int,
                 variants: dict[str, list[str]]) -> dict[str, list[Timer]]:
    data_dir = make_synthetic_datadir(
        tmp / "data64", {f"d{i:02d}": 24 for i in range(64)}, vocab_size=8192, doc_len=300,
        split_docs={"val": 8, "test": 2},
    )
    # Lazy initialisation (allocator, kernels, torch.func) is paid once, before timing.
    run(data_dir, tmp / "warm", 3, threads, seq)
    for name, extra in variants.items():
        run(data_dir, tmp / f"warm-{name}", 3, threads, seq, "mixer.name='dga'",
            "mixer.options.update_every=1", *extra)
    times: dict[str, list[Timer]] = {"stratified": [], **{name: [] for name in variants}}
    for r in range(repeats):
        times["stratified"].append(run(data_dir, tmp / f"s{r}", steps, threads, seq))
        for name, extra in variants.items():
            times[name].append(run(data_dir, tmp / f"{name}{r}", steps, threads, seq,
                                   "mixer.name='dga'", "mixer.options.update_every=10", *extra))
        print(f"  repeat {r}: " + ", ".join(f"{k} CPU {v[-1].cpu:.1f}s wall {v[-1].wall:.1f}s"
                                            for k, v in times.items()), file=sys.stderr)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=512, help="(a) samples measured")
    ap.add_argument("--seq", type=int, default=32, help="(a) tokens per sample")
    ap.add_argument("--seq-b", type=int, default=128, help="(b) tokens per sample")
    ap.add_argument("--timed-groups", type=int, default=2, help="(a) published-loop groups timed")
    ap.add_argument("--steps", type=int, default=40, help="(b) training steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="(b) runs per method")
    ap.add_argument("--jvp-samples", type=int, default=8, help="(b) DGA jvp alignment batch")
    ap.add_argument("--fd-samples", type=int, default=32, help="(b) DGA fd alignment batch")
    ap.add_argument("--target-windows", type=int, default=8, help="(b) DGA target windows/update")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print("(a) per-group alignments: engine vs loops", file=sys.stderr)
    rows = engine_vs_loop(args.n, args.seq, [8, 64, 512], args.timed_groups)
    print(f"(a) GPT d96/L3/vocab 8192 (1.13M parameters), {args.n} samples x {args.seq} tokens, "
          f"{args.threads} thread(s); CPU seconds (wall in brackets); ratios of CPU times")
    print("| k | samples/group | loop | published (est.) | jvp | fd | loop/jvp | loop/fd "
          "| published/jvp | published/fd | rel. err jvp | rel. err fd | cos fd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lp, (pw, pc), tj, tf = r["loop"], r["published"], r["jvp"], r["fd"]
        print(f"| {r['k']} | {r['per_group']} | {lp.cpu:.1f} ({lp.wall:.1f}) | {pc:.1f} ({pw:.1f}) | "
              f"{tj.cpu:.1f} ({tj.wall:.1f}) | {tf.cpu:.1f} ({tf.wall:.1f}) | {lp.cpu / tj.cpu:.2f} | "
              f"{lp.cpu / tf.cpu:.2f} | {pc / tj.cpu:.1f} | {pc / tf.cpu:.1f} | "
              f"{r['err_jvp']:.1e} | {r['err_fd']:.1e} | {r['cos_fd']:.5f} |")

    print("(b) DGA wall time over stratified, 64 domains", file=sys.stderr)
    tw = f"mixer.options.target_windows={args.target_windows}"
    variants = {
        f"dga-jvp-{args.jvp_samples}": ["mixer.options.method='jvp'",
                                        f"mixer.options.align_samples={args.jvp_samples}", tw],
        f"dga-fd-{args.fd_samples}": ["mixer.options.method='fd'",
                                      f"mixer.options.align_samples={args.fd_samples}", tw],
    }
    with tempfile.TemporaryDirectory() as tmp:
        times = dga_overhead(Path(tmp), args.steps, args.repeats, args.threads, args.seq_b, variants)
    base = times["stratified"]
    print(f"(b) 64 domains, GPT d96/L3/vocab 8192, batch 16 x {args.seq_b} tokens, {args.steps} "
          f"steps, T_r = 10, target gradient on {args.target_windows} probe windows per update, "
          f"{args.threads} thread(s), {args.repeats} alternating repeats")
    print("| run | median CPU s | median wall s | median paired ratio, CPU | median paired ratio, wall "
          "| goal |")
    print("|---|---|---|---|---|---|")
    for name in ["stratified", *variants]:
        t = times[name]
        rc = statistics.median([a.cpu / b.cpu for a, b in zip(t, base)])
        rw = statistics.median([a.wall / b.wall for a, b in zip(t, base)])
        goal = "" if name == "stratified" else "<= 1.15"
        print(f"| {name} | {statistics.median(x.cpu for x in t):.1f} | "
              f"{statistics.median(x.wall for x in t):.1f} | {rc:.3f} | {rw:.3f} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
