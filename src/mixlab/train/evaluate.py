"""Evaluation on fixed, seeded subsets: per-domain loss and perplexity, and target loss.

Each subset is chosen once per run from ``(seed, domain)`` and loaded into memory (they are
small), so every evaluation of a run — and every run with the same seed — scores exactly the
same windows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mixlab.data.format import DataDir
from mixlab.data.sampler import eval_windows
from mixlab.model import per_sample_loss
from mixlab.train.distributed import DistInfo, all_reduce_sum


@dataclass
class EvalSet:
    """Token windows to score, grouped by name (a domain, or 'target')."""

    windows: dict[str, torch.Tensor]
    """name -> LongTensor [n, seq_len + 1]."""

    @classmethod
    def from_data(
        cls, data: DataDir, domains: list[str], split: str, n: int, seq_len: int, seed: int
    ) -> EvalSet:
        out = {}
        for d in domains:
            idx = eval_windows(data, d, split, n, seq_len, seed)
            out[d] = torch.from_numpy(data.split(d, split).windows(idx, seq_len + 1))
        return cls(out)


@torch.no_grad()
def mean_losses(
    model: torch.nn.Module,
    windows: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) of ``model`` on each named set of windows.

    All windows of a set have the same length, so the mean of per-window means is the token
    mean. Under ``torchrun`` each rank scores every world_size-th window and the sums are
    all-reduced, so every rank returns the same numbers.
    """
    info = dist_info or DistInfo()
    was_training = model.training
    model.eval()
    names = list(windows)
    sums = np.zeros(len(names))
    counts = np.zeros(len(names))
    try:
        for i, name in enumerate(names):
            w = windows[name][info.rank :: info.world_size]
            for start in range(0, w.shape[0], batch_size):
                chunk = w[start : start + batch_size].to(device, non_blocking=True)
                with autocast():
                    sums[i] += float(per_sample_loss(model, chunk).double().sum())
            counts[i] = w.shape[0]
    finally:
        model.train(was_training)
    sums = all_reduce_sum(sums, info)
    counts = all_reduce_sum(counts, info)
    return {name: float(sums[i] / max(1.0, counts[i])) for i, name in enumerate(names)}


def loss_report(losses: dict[str, float], domains: list[str], target: float | None) -> dict:
    """The eval record of metrics.jsonl/summary.json from per-domain losses."""
    loss = {d: losses[d] for d in domains}
    ppl = {d: _safe_exp(v) for d, v in loss.items()}
    return {
        "loss": loss,
        "ppl": ppl,
        "avg_loss": float(np.mean(list(loss.values()))),
        "avg_ppl": float(np.mean(list(ppl.values()))),
        "target_loss": target,
    }


def _safe_exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
