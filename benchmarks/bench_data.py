"""Data pipeline throughput: ``prepare`` (MB of text per second) and the sampler (tokens per
second, and batch assembly time as a fraction of one training step of a ~1M-parameter model).

Everything runs in one process on the built-in corpus; the step and the batch assembly are
timed alternately so machine noise hits both alike.

    python benchmarks/bench_data.py [--threads 2] [--batches 200] [--steps 10]
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

from mixlab.data.format import DataDir
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.data.sampler import MixtureSampler
from mixlab.model import ModelConfig, build_model, count_parameters, per_sample_loss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "builtin"
        t0 = time.perf_counter()
        data = prepare(PrepareConfig(source="builtin", out=str(out)))
        prep_s = time.perf_counter() - t0
        mb = sum(d.bytes for d in data.manifest.domains) / 1e6
        tokens = sum(s.tokens for d in data.manifest.domains for s in d.splits.values())
        print(f"prepare builtin: {mb:.2f} MB of text, {tokens:,} tokens in {prep_s:.1f} s "
              f"-> {mb / prep_s:.2f} MB/s ({tokens / prep_s:,.0f} tokens/s), "
              "tokenizer training included")

        data = DataDir.open(out)
        seq, batch = 256, 16
        m = len(data.domains)
        sampler = MixtureSampler(data, "train", seq, batch, seed=0)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            sampler.next_batch(weights=rng.dirichlet(np.ones(m)))  # a new mixture every batch
        dt = time.perf_counter() - t0
        per_batch = dt / args.batches
        print(f"sampler (seq {seq}, batch {batch}, new weights every batch): "
              f"{per_batch * 1e3:.3f} ms/batch, {batch * seq / per_batch:,.0f} tokens/s")

        model = build_model(ModelConfig(d_model=96, n_layer=3, n_head=3), data.vocab_size, seq)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step_times, batch_times = [], []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            b = sampler.next_batch()
            batch_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loss = per_sample_loss(model, b.tokens).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
        step = statistics.median(step_times[1:])
        assemble = statistics.median(batch_times[1:])
        print(f"training step of a {count_parameters(model) / 1e6:.2f}M-parameter GPT: "
              f"{step * 1e3:.1f} ms; batch assembly {assemble * 1e3:.3f} ms "
              f"= {assemble / step:.5f} of a step ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
