"""Reference loop vs a bare hand-written PyTorch loop: training tokens/s on the same model and data.

Both loops train the same ~1M-parameter GPT (d96/L3, vocab 8192, context 256, batch 16) with
AdamW, warmup + cosine, clipping, on the same synthetic data dir; the bare loop reads windows
straight from a preloaded tensor and does nothing else. Runs alternate (bare, mixlab, bare,
mixlab, ...) in one process so machine noise hits both alike; the ratio of medians is printed.

    python benchmarks/bench_loop.py [--steps 25] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixlab.data.format import DataDir
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.model import build_model, per_sample_loss
from mixlab.train.config import load_config
from mixlab.train.loop import Trainer, build_optimizer


def overrides(data_dir: Path, steps: int, threads: int) -> list[str]:
    return [
        f"data.dir='{data_dir}'", "data.seq_len=256", "model.d_model=96", "model.n_layer=3",
        "model.n_head=3", f"train.steps={steps}", "train.batch_size=16", "train.progress=false",
        f"train.threads={threads}", "train.log_every=10", "eval.every=0", "eval.windows=1",
        "eval.signal_windows=1", "eval.test_windows=1", "optim.warmup_steps=5",
    ]


def bare_loop(cfg, data: DataDir, steps: int) -> float:
    """Tokens/s of a minimal loop: random windows from one preloaded tensor, nothing else."""
    torch.manual_seed(0)
    model = build_model(cfg.model, data.vocab_size, cfg.data.seq_len)
    opt = build_optimizer(model, cfg)
    length = cfg.data.seq_len + 1
    pool = torch.cat([
        torch.from_numpy(data.split(d, "train").windows(np.arange(64), length)) for d in data.domains
    ])
    gen = torch.Generator().manual_seed(0)
    o = cfg.optim
    t0 = time.perf_counter()
    for step in range(steps):
        lr = o.lr * min(1.0, (step + 1) / o.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, pool.shape[0], (cfg.train.batch_size,), generator=gen)
        loss = per_sample_loss(model, pool[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
    dt = time.perf_counter() - t0
    return steps * cfg.train.batch_size * cfg.data.seq_len / dt


def mixlab_loop(cfg, out: Path) -> float:
    trainer = Trainer(cfg, out)
    trainer.run()
    # elapsed_s covers the loop itself, not the final summary evaluation.
    return trainer.state.tokens / trainer.state.elapsed_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = make_synthetic_datadir(
            tmp / "data", {f"d{i}": 300 for i in range(5)}, vocab_size=8192, doc_len=600, patterned=False
        )
        data = DataDir.open(data_dir)
        cfg = load_config(None, overrides(data_dir, args.steps, args.threads))
        # Warm-up: the first run in a process pays for lazy initialisation (allocator, kernels).
        bare_loop(cfg, data, 5)
        mixlab_loop(load_config(None, overrides(data_dir, 5, args.threads)), tmp / "warm")
        bare, ours = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, data, args.steps))
            ours.append(mixlab_loop(cfg, tmp / f"run{r}"))
            print(f"repeat {r}: bare {bare[-1]:,.0f} tok/s, mixlab {ours[-1]:,.0f} tok/s", file=sys.stderr)
    b, m = statistics.median(bare), statistics.median(ours)
    pair = statistics.median([o / x for o, x in zip(ours, bare)])
    print(f"model d96/L3/vocab 8192/ctx 256/batch 16, {args.steps} steps x {args.repeats} repeats, "
          f"{args.threads} threads")
    print(f"bare loop   median {b:,.0f} tokens/s")
    print(f"mixlab loop median {m:,.0f} tokens/s")
    print(f"ratio of medians mixlab / bare = {m / b:.3f}; median of paired ratios = {pair:.3f} "
          "(goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
