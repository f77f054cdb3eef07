"""Learning-rate schedule: linear warmup, then cosine decay to ``lr * min_lr_ratio``."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for 0-based optimizer step ``step``.

    Warmup reaches ``lr`` at step ``warmup_steps - 1``; the cosine then reaches
    ``lr * min_lr_ratio`` at the last step ``total_steps - 1``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
