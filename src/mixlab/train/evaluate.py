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
    same_forwards: bool = False,
) -> dict[str, float]:
    """Mean next-token loss (nats/token) of ``model`` on each named set of windows.

    All windows of a set have the same length, so the mean of per-window means is the token
    mean. The windows are cut into chunks of ``batch_size``; under ``torchrun`` rank r scores
    chunks r, r + world_size, ... Each window's loss goes into its own slot of a vector that is
    zero elsewhere, the vectors are all-reduced (x + 0 = x exactly) and summed in window order.
    So every chunk is the same forward (same shape, same content) in any number of processes,
    and the result is bit-identical to one process's, not merely close.

    ``same_forwards``: every rank runs the same number of forwards (a sharded model's forward is
    a collective); a rank with no chunk left re-scores its last one and discards it.
    """
    info = dist_info or DistInfo()
    names = list(windows)
    sizes = [int(windows[k].shape[0]) for k in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # (set index, first window) of every chunk, in a fixed order that does not depend on ranks.
    chunks = [(i, s) for i, n in enumerate(sizes) for s in range(0, n, batch_size)]
    mine = chunks[info.rank :: info.world_size]
    if same_forwards and chunks:
        rounds = -(-len(chunks) // info.world_size)
        mine = mine + [None] * (rounds - len(mine))  # type: ignore[list-item]
    per_window = np.zeros(int(offsets[-1]))
    was_training = model.training
    model.eval()
    last = None
    try:
        for job in mine:
            real = job is not None
            i, start = job if real else (last or chunks[0])
            chunk = windows[names[i]][start : start + batch_size].to(device, non_blocking=True)
            with autocast():
                values = per_sample_loss(model, chunk).double().cpu().numpy()
            if real:
                per_window[offsets[i] + start : offsets[i] + start + len(values)] = values
                last = job
    finally:
        model.train(was_training)
    per_window = all_reduce_sum(per_window, info)
    return {
        name: float(per_window[offsets[i] : offsets[i + 1]].sum() / max(1, sizes[i]))
        for i, name in enumerate(names)
    }


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
