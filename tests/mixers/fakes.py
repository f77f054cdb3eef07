"""Fakes for mixer tests: a Signals object, signal generators and a loop driver (no model).

Every generator is a pure function of (seed, step, plan), so two runs that see the same plans
see the same signals: what a resume test needs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mixlab.data.sampler import closest_counts
from mixlab.errors import ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan

DOMAINS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def make_ctx(
    m: int = 3, total_steps: int = 100, batch_size: int = 8, seed: int = 0
) -> MixerContext:
    return MixerContext(
        domains=DOMAINS[:m],
        train_tokens=np.arange(1, m + 1, dtype=np.int64) * 1000,
        total_steps=total_steps,
        batch_size=batch_size,
        seq_len=16,
        seed=seed,
    )


@dataclass
class FakeSignals:
    """Signals with fixed values; asking for one that was not given fails the test."""

    step: int
    train: np.ndarray | None = None
    counts: np.ndarray | None = None
    eval: np.ndarray | None = None
    reference: np.ndarray | None = None
    excess: np.ndarray | None = None
    branch: Callable[[np.ndarray, int], np.ndarray] | None = None
    calls: list[str] = field(default_factory=list)
    branch_calls: list[tuple[np.ndarray, int]] = field(default_factory=list)
    branch_options: list[dict[str, Any]] = field(default_factory=list)
    """Per branch call: its ``counts`` and ``stream`` arguments."""

    def _get(self, name: str, value: np.ndarray | None) -> np.ndarray:
        self.calls.append(name)
        if value is None:
            raise AssertionError(f"the mixer asked for {name}, which this test does not provide")
        return np.array(value, dtype=np.float64)

    def train_losses(self) -> np.ndarray:
        return self._get("train_losses", self.train)

    def train_counts(self) -> np.ndarray:
        return self._get("train_counts", self.counts).astype(np.int64)

    def eval_losses(self) -> np.ndarray:
        return self._get("eval_losses", self.eval)

    def reference_losses(self) -> np.ndarray:
        return self._get("reference_losses", self.reference)

    def excess_losses(self) -> np.ndarray:
        return self._get("excess_losses", self.excess)

    def target_loss(self) -> float:
        raise ConfigError("no target configured in this fake")

    align_scale: float = 1.0
    align_seed: int = 0

    def sample_alignments(self, counts, direction="target", method="jvp", precondition=False,
                          probes=0, target_windows=0):
        from mixlab.signals.alignment import SampleAlignments

        self.calls.append("sample_alignments")
        rng = np.random.default_rng([self.align_seed, self.step + 1, 17])
        domains = np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))
        return SampleAlignments(
            values=self.align_scale * rng.normal(size=domains.size),
            domains=domains,
            direction_sq_norm=abs(self.align_scale) * float(rng.uniform(0.5, 2.0)),
            probe_values=self.align_scale * rng.normal(size=(probes, domains.size)),
        )

    def domain_gradient_gram(self, counts, target=False, target_windows=0):
        """A seeded Gram matrix G = V V^T of random per-domain gradients V [m (+1), 5], scaled
        like the alignments; rows/columns of domains with count 0 are NaN."""
        self.calls.append("domain_gradient_gram")
        counts = np.asarray(counts)
        rng = np.random.default_rng([self.align_seed, self.step + 1, 19])
        v = rng.normal(size=(counts.size + int(target), 5))
        g = np.abs(self.align_scale) * (v @ v.T)
        absent = np.flatnonzero(counts == 0)
        g[absent, :] = np.nan
        g[:, absent] = np.nan
        return g

    def learning_rate(self) -> float:
        return 1e-3

    def target_histogram(self) -> np.ndarray:
        return np.arange(1.0, len(self.train if self.train is not None else self.counts) + 1)

    def cluster_parents(self) -> np.ndarray:
        raise ConfigError("no cluster hierarchy in this fake")

    def branch_eval_deltas(
        self, mixtures: np.ndarray, steps: int, counts: np.ndarray | None = None, stream: int = 0
    ) -> np.ndarray:
        self.calls.append("branch_eval_deltas")
        self.branch_calls.append((np.array(mixtures), steps))
        self.branch_options.append(
            {"counts": None if counts is None else np.array(counts), "stream": stream}
        )
        if self.branch is None:
            raise AssertionError("the mixer asked for branch_eval_deltas, not provided here")
        return np.array(self.branch(np.asarray(mixtures), steps), dtype=np.float64)


def plan_counts(plan: Plan | None, m: int, batch: int) -> np.ndarray:
    """The batch composition a plan leads to (exact counts, else the closest to its weights)."""
    if plan is None:
        return np.zeros(m, dtype=np.int64)
    if plan.counts is not None:
        return np.asarray(plan.counts, dtype=np.int64)
    return closest_counts(plan.weights, batch)


REGIMES = ("normal", "zeros", "huge", "tiny", "mixed")


def synthetic_signals(m: int, batch: int, regime: str = "normal", seed: int = 0):
    """Factory (step, plan) -> FakeSignals with every signal set, values chosen by ``regime``.

    normal: losses in [1, 5]; zeros: all 0; huge: ~1e30; tiny: ~1e-30; mixed: each step picks
    one of those at random, and eval/reference values may be NaN or inf. Train and reference
    losses are NaN for domains absent from the batch, as the trainer reports them.
    """
    scales = {"normal": 1.0, "zeros": 0.0, "huge": 1e30, "tiny": 1e-30}

    def make(step: int, plan: Plan | None) -> FakeSignals:
        rng = np.random.default_rng([seed, step + 1])
        counts = plan_counts(plan, m, batch)
        reg = regime if regime != "mixed" else str(rng.choice(["normal", "zeros", "huge", "tiny"]))
        scale = scales[reg]

        def draw() -> np.ndarray:
            return scale * rng.uniform(1.0, 5.0, size=m)

        train, reference, ev = draw(), draw(), draw()
        if regime == "mixed":
            bad = rng.random(m) < 0.2
            ev[bad] = rng.choice([np.nan, np.inf], size=int(bad.sum()))
            reference[rng.random(m) < 0.2] = np.nan
        absent = counts == 0
        train[absent] = np.nan
        reference[absent] = np.nan
        deltas = scale * rng.uniform(-0.5, 1.0, size=(m, m))
        # Per-token clipped excess (DoReMi): >= the clipped difference of the means; drawn last
        # so that the other signals keep their values.
        with np.errstate(invalid="ignore"):
            excess = np.maximum(train - reference, 0.0) + scale * rng.uniform(0.0, 1.0, size=m)
        fake = FakeSignals(
            step,
            train=train,
            counts=counts,
            eval=ev,
            reference=reference,
            excess=excess,
            branch=lambda mix, steps: deltas[: len(mix)],
        )
        # Alignments are products of two gradients: they scale with the loss squared.
        fake.align_scale = scale**2 if np.isfinite(scale**2) else np.finfo(np.float64).max
        return fake

    return make


class LinearLawSim:
    """Losses that follow the linear dynamic mixing law L^{t+1} = L^t - A q^t exactly.

    q^t is the mixture actually trained at step t (a plan's counts / batch when it gives
    counts, else its weights). ``noise`` adds seeded Gaussian noise to every eval reading.
    """

    def __init__(
        self, A: np.ndarray, L0: np.ndarray, batch: int, noise: float = 0.0, seed: int = 0
    ):
        self.A = np.asarray(A, dtype=np.float64)
        self.L = np.asarray(L0, dtype=np.float64).copy()
        self.batch = batch
        self.noise = noise
        self.seed = seed
        self.trained: list[np.ndarray] = []

    def __call__(self, step: int, plan: Plan | None) -> FakeSignals:
        m = self.L.size
        counts = plan_counts(plan, m, self.batch)
        if plan is not None:
            q = counts / self.batch if plan.counts is not None else np.asarray(plan.weights)
            self.trained.append(q)
            self.L = self.L - self.A @ q
        reading = self.L.copy()
        if self.noise:
            reading += self.noise * np.random.default_rng([self.seed, step + 1]).standard_normal(m)
        return FakeSignals(step, eval=reading, counts=counts, train=self.L.copy())


def drive(
    mixer: Mixer,
    make_signals: Callable[[int, Plan | None], FakeSignals | None],
    steps: int,
    first: int = 0,
    skip: frozenset[int] = frozenset(),
    start: bool = True,
) -> list[Plan]:
    """Run the trainer's protocol: start() on a fresh run, then plan -> observe per step.

    Steps in ``skip`` behave like the trainer's non-finite steps: planned, trained (the
    signal factory still sees the plan), never observed.
    """
    if start and first == 0:
        mixer.start(make_signals(-1, None))
    plans = []
    for step in range(first, first + steps):
        plan = mixer.plan(step)
        plans.append(plan)
        signals = make_signals(step, plan)
        if step not in skip:
            mixer.observe(step, signals)
    return plans


def torch_roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` after torch.save + torch.load(weights_only=True), as a checkpoint loads it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested state/plan values, where NaN equals NaN."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a} != {b}"
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def plan_fields(plan: Plan) -> dict[str, Any]:
    return {
        "weights": np.asarray(plan.weights),
        "counts": None if plan.counts is None else np.asarray(plan.counts),
        "loss_weights": None if plan.loss_weights is None else np.asarray(plan.loss_weights),
        "phase": plan.phase,
    }
