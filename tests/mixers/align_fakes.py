"""Fakes and helpers for the alignment-based mixers (DGA, DoGE, importance sampling)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixlab.data.format import MANIFEST, write_json_atomic
from mixlab.errors import ConfigError
from mixlab.signals.alignment import SampleAlignments
from mixlab.train.config import TrainConfig, load_config


def constant_alignments(
    a: np.ndarray, sq: float = 1.0, probe: np.ndarray | None = None
) -> Callable[[np.ndarray, str, int], SampleAlignments]:
    """A measurement where every sample of domain i has alignment ``a[i]`` and, for each probe
    r, probe value ``probe[r, i]`` (default: all ones); <v, P v> = ``sq``."""

    def measure(counts: np.ndarray, direction: str, probes: int) -> SampleAlignments:
        domains = np.repeat(np.arange(len(counts)), counts)
        pv = np.ones((probes, len(counts))) if probe is None else np.asarray(probe, dtype=np.float64)
        return SampleAlignments(
            values=np.asarray(a, dtype=np.float64)[domains],
            domains=domains,
            direction_sq_norm=sq,
            probe_values=pv[:probes, domains] if probes else np.zeros((0, domains.size)),
        )

    return measure


@dataclass
class AlignSignals:
    """Signals offering what the alignment mixers ask for; records every alignment request."""

    step: int
    measure: Callable[[np.ndarray, str, int], SampleAlignments] | None = None
    lr: float = 1e-3
    histogram: np.ndarray | None = None
    parents: np.ndarray | None = None
    calls: list[tuple] = field(default_factory=list)
    target_windows: int = 0

    def sample_alignments(self, counts, direction="target", method="jvp", precondition=False,
                          probes=0, target_windows=0):
        self.calls.append((np.array(counts), direction, method, precondition, probes))
        self.target_windows = target_windows
        if self.measure is None:
            raise AssertionError("the mixer measured alignments, which this test does not expect")
        return self.measure(np.asarray(counts), direction, probes)

    def learning_rate(self) -> float:
        return self.lr

    def target_histogram(self) -> np.ndarray:
        if self.histogram is None:
            raise ConfigError("no target configured in this fake")
        return np.array(self.histogram, dtype=np.float64)

    def cluster_parents(self) -> np.ndarray:
        if self.parents is None:
            raise ConfigError("no cluster hierarchy in this fake")
        return np.array(self.parents, dtype=np.int64)


def tiny_config(data_dir: Path, *extra: str) -> TrainConfig:
    """A ~30k-parameter GPT (2 layers, width 32) on 16-token windows, batch 8, no progress bar."""
    return load_config(None, [
        f"data.dir='{data_dir}'", "data.seq_len=16", "model.d_model=32", "model.n_layer=2",
        "model.n_head=2", "train.steps=24", "train.batch_size=8", "train.log_every=4",
        "train.progress=false", "optim.warmup_steps=4", "eval.every=8", "eval.windows=8",
        "eval.signal_windows=4", "eval.test_windows=8", *extra,
    ])


def add_hierarchy(data_dir: Path, parents: list[int]) -> None:
    """Write a coarse-cluster hierarchy into a data dir's manifest, as ``mixlab cluster`` does."""
    import json

    path = Path(data_dir) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["extra"]["clusters"] = {"parents": parents, "coarse_k": max(parents) + 1}
    write_json_atomic(path, manifest)
