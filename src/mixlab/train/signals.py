"""Lazily computed signals handed to a mixer after each step (see ``mixers.base.Signals``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixlab.errors import ConfigError

if TYPE_CHECKING:
    from mixlab.train.loop import Trainer


def per_domain_mean(values: np.ndarray, domains: np.ndarray, m: int) -> np.ndarray:
    """[m] mean of ``values`` [b] per domain index ``domains`` [b]; NaN where a domain is absent."""
    sums = np.bincount(domains, weights=values, minlength=m)
    counts = np.bincount(domains, minlength=m)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class StepSignals:
    """Signals of one finished step. Every expensive value is computed on first use only."""

    def __init__(
        self,
        step: int,
        trainer: Trainer,
        sample_losses: np.ndarray | None,
        domains: np.ndarray | None,
        batch_tokens: torch.Tensor | None,
    ):
        self.step = step
        self._trainer = trainer
        self._losses = sample_losses
        self._domains = domains
        self._tokens = batch_tokens
        self._cache: dict[str, object] = {}

    def _cached(self, key: str, fn: Callable[[], object]) -> object:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def train_losses(self) -> np.ndarray:
        m = self._trainer.m
        if self._losses is None:
            return np.full(m, np.nan)
        return per_domain_mean(self._losses, self._domains, m)

    def train_counts(self) -> np.ndarray:
        m = self._trainer.m
        if self._domains is None:
            return np.zeros(m, dtype=np.int64)
        return np.bincount(self._domains, minlength=m)

    def eval_losses(self) -> np.ndarray:
        return self._trainer.signal_eval_losses(self.step)

    def target_loss(self) -> float:
        return self._trainer.target_probe_loss(self.step)

    def reference_losses(self) -> np.ndarray:
        def compute() -> np.ndarray:
            if self._tokens is None:
                return np.full(self._trainer.m, np.nan)
            ref = self._trainer.reference_sample_losses(self._tokens)
            return per_domain_mean(ref, self._domains, self._trainer.m)

        return self._cached("reference", compute)  # type: ignore[return-value]

    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int) -> np.ndarray:
        mixtures = np.atleast_2d(np.asarray(mixtures, dtype=np.float64))
        if mixtures.shape[1] != self._trainer.m:
            raise ConfigError(f"branch mixtures must have {self._trainer.m} columns.")
        return self._trainer.branch_eval_deltas(mixtures, steps, self.step)
