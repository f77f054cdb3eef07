"""The mixer protocol, the plan it returns, the signals it observes, and the one registry.

A mixer decides the domain mixture of every training step. The trainer calls, at every step::

    plan = mixer.plan(step)          # before the batch is drawn
    ... train one step on a batch drawn from plan ...
    mixer.observe(step, signals)     # after the optimizer step

``signals`` is lazy: the trainer computes only what the mixer asks for (an eval pass costs
time, so a mixer that never calls ``signals.eval_losses()`` never triggers one).

Update rules live in pure functions next to each mixer (arrays in, arrays out; no logging, no
I/O, no distributed calls). Everything a mixer keeps between steps goes through
``state_dict()`` / ``load_state_dict()`` and must hold only Python scalars, lists, dicts and
torch tensors, so that checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from mixlab.config import from_dict, suggest
from mixlab.errors import ConfigError

if TYPE_CHECKING:
    from mixlab.signals.alignment import SampleAlignments


@dataclass(frozen=True)
class Plan:
    """What to train on at one step.

    ``weights`` [m] is the sampling distribution over domains. ``counts`` [m], when given, is
    an exact per-batch composition (non-negative ints summing to the global batch size) that
    the sampler must honour; ``weights`` then records the mixture actually trained
    (``counts / batch``). ``loss_weights`` [m], when given, is a distribution w: a sample of
    domain i has its loss multiplied by ``w_i / q_i`` where q = ``weights``.
    """

    weights: np.ndarray
    counts: np.ndarray | None = None
    loss_weights: np.ndarray | None = None
    phase: str = "train"
    """A label recorded in metrics (e.g. Aioli's 'probe' steps)."""


@dataclass(frozen=True)
class MixerContext:
    """What a mixer may know about the run when it is built."""

    domains: list[str]
    """Domain names, in the order of every [m] array."""
    train_tokens: np.ndarray
    """[m] tokens in each domain's train split."""
    total_steps: int
    """Optimizer steps in the whole run (every step counts, probes included)."""
    batch_size: int
    """Global batch size in samples (all ranks and accumulation micro-batches together)."""
    seq_len: int
    seed: int

    @property
    def m(self) -> int:
        return len(self.domains)


class Signals(Protocol):
    """Lazily computed observations for the step that just finished."""

    step: int

    def train_losses(self) -> np.ndarray:
        """[m] mean per-sample training loss of each domain in this step's batch (nats/token,
        before loss weighting); NaN for a domain with no sample in the batch."""
        ...

    def train_counts(self) -> np.ndarray:
        """[m] number of samples of each domain in this step's batch."""
        ...

    def eval_losses(self) -> np.ndarray:
        """[m] loss of the current model on the fixed, seeded mixer-eval subset of each domain's
        validation split. Computed on first call and cached for this step."""
        ...

    def target_loss(self) -> float:
        """Loss of the current model on the target set's probe part (disjoint from the part the
        report evaluates). Raises ConfigError when no target is configured."""
        ...

    def reference_losses(self) -> np.ndarray:
        """[m] mean per-sample loss of the *reference model* (``[mixer] reference`` = a finished
        run dir) on this step's batch, per domain; NaN for a domain with no sample. Raises
        ConfigError when no reference model is configured (DoReMi needs one)."""
        ...

    def excess_losses(self) -> np.ndarray:
        """[m] DoReMi's excess loss of this step's batch per domain: the mean over the domain's
        tokens of max(ℓ_proxy - ℓ_ref, 0), clipped per token; NaN for a domain with no sample.
        Raises ConfigError when no reference model is configured."""
        ...

    def branch_eval_deltas(
        self,
        mixtures: np.ndarray,
        steps: int,
        counts: np.ndarray | None = None,
        stream: int = 0,
    ) -> np.ndarray:
        """For each row of ``mixtures`` [k, m], train a *copy* of the current model (and
        optimizer state) for ``steps`` steps on batches drawn from that mixture, and return the
        drop of the mixer-eval loss of every domain [k, m] (before - after; positive = improved).
        The main run's model, optimizer and data order are untouched; the steps are counted as
        the run's ``extra_steps``. ``counts`` [k, m] (ints, each row summing to the batch size):
        every batch of branch k holds exactly ``counts[k]`` samples per domain (``mixtures`` is
        then ``counts / batch``). ``stream``: which data windows the branches read; branch k of
        stream s always reads the same ones, so a mixer that measures repeatedly passes a new
        stream each time (a pure function of the step, for exact resumes). Used by Skill-It to
        learn its skills graph and by Aioli's ``probes = "branch"``."""
        ...

    def sample_alignments(
        self,
        counts: np.ndarray,
        direction: str = "target",
        method: str = "jvp",
        precondition: bool = False,
        probes: int = 0,
        target_windows: int = 0,
    ) -> SampleAlignments:
        """Per-sample gradient alignments ``<∇ℓ_x(θ), P v>`` of the current model on a fresh
        measurement batch with exactly ``counts[i]`` samples of domain i (any positive total),
        drawn from the trainer's auxiliary data stream in global batches, the last one padded
        (padding is read, never measured); the training data order is untouched. ``direction`` v: ``"target"`` (mean-loss
        gradient of the target's probe windows), ``"val"`` (of the mixer-eval validation windows,
        mean over domains) or ``"domains"`` (Σ_i of each domain's mean-loss gradient on another
        fresh batch with the same counts). ``method``: ``"jvp"`` (forward-mode AD, exact) or
        ``"fd"`` (central finite difference). ``precondition``: P = Adam's denominator
        ``1/(sqrt(v̂)+ε)``, else identity. ``probes``: that many seeded Gaussian directions
        measured on the same batch. ``target_windows`` > 0: the target gradient uses a seeded
        random subset of that many probe windows, new at every step (bounds its cost). Returns values [N], domains [N], ``<v, P v>`` and probe values
        [probes, N] (``mixlab.signals.alignment.SampleAlignments``). Every call draws new batches.
        Raises ConfigError for a ``"target"`` direction without a target."""
        ...

    def domain_gradient_gram(
        self, counts: np.ndarray, target: bool = False, target_windows: int = 0
    ) -> np.ndarray:
        """[k, k] Gram matrix <g_a, g_b> of the per-domain mean-loss gradients of the current
        model on one fresh auxiliary batch with ``counts[i]`` samples of domain i (one backward
        per domain; k = m), and with ``target`` of the target's probe gradient as row/column m
        (k = m + 1). NaN rows/columns for a domain with count 0 (DoGE's published estimator)."""
        ...

    def alignment(
        self,
        direction: str = "target",
        counts: np.ndarray | None = None,
        method: str = "jvp",
        precondition: bool = False,
    ) -> np.ndarray:
        """[m] per-domain mean of ``sample_alignments(counts, direction, method, precondition)``
        (the alignment of each domain's mean-loss gradient with v); NaN for a domain with count 0.
        ``counts`` defaults to one global batch split as evenly as possible over the domains."""
        ...

    def learning_rate(self) -> float:
        """The learning rate of this step under the run's schedule (DoGE scales by it)."""
        ...

    def target_histogram(self) -> np.ndarray:
        """[m] distribution of the target's probe documents over the domains (clusters): one-hot
        for a target held out from one domain. Raises ConfigError when it cannot be computed (no
        target, or a text target and no cluster assignment); importance sampling then needs the
        histogram as an option."""
        ...

    def cluster_parents(self) -> np.ndarray:
        """[m] coarse-cluster index of each domain, from the data dir's cluster hierarchy
        (manifest ``extra["clusters"]["parents"]``, written by ``mixlab cluster --coarse``).
        Raises ConfigError when the data dir has none."""
        ...


class Mixer:
    """Base class: subclasses define ``Config`` (a dataclass of their options) and ``plan``."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False
    """True when the mixture changes during training (these take part in ``mixlab demo``)."""
    needs_reference: ClassVar[bool] = False
    """True when the method needs a reference model (``[mixer] reference``), like DoReMi."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Capabilities of the training driver its signals need (``mixlab.train.session.CAPABILITIES``:
    ``"full_model"``, ``"branches"``); a driver that lacks one refuses the mixer up front (see
    ``needs_for``)."""
    needs_hint: ClassVar[str] = ""
    """What else the user can do when a driver lacks what ``needs_for`` asks (added to the refusal)."""
    own_A: ClassVar[tuple[tuple[str, str], ...]] = ()
    """The method's own mixing-law matrix A (``mixlab.lmo``) in its ``report()``, as (report key,
    description) pairs: ``mixlab lmo`` reads the first key the run logged (a vector is the
    diagonal of A) and compares it with the fitted A. Empty: the method has no A of its own."""

    @classmethod
    def needs_for(cls, config: Any) -> frozenset[str]:
        """The capabilities this configuration (an instance of ``Config``) needs: ``needs``
        unless a subclass knows better (Aioli's branch probes)."""
        return cls.needs

    @classmethod
    def loss_mixture(cls, options: dict[str, Any]) -> tuple[str, str] | None:
        """(report key, description) of the mixture that weights the loss, for a method that
        samples by one mixture and weights the loss by another (the gradient then follows this
        one, not the logged sampling weights); None when the gradient follows the sampled
        mixture. ``options``: the run's ``[mixer.options]`` table as written in its config."""
        return None

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any, ctx: MixerContext):
        self.config = config
        self.ctx = ctx

    def plan(self, step: int) -> Plan:
        raise NotImplementedError

    def start(self, signals: Signals) -> None:
        """Called once before the first step of a fresh run (not on resume), with signals of the
        initial model (``eval_losses`` works; ``train_losses`` is all NaN)."""

    def observe(self, step: int, signals: Signals) -> None:
        """Called after optimizer step ``step`` (0-based); static mixers ignore it.

        A step whose loss was NaN/inf is skipped by the trainer and *not* observed, so mixers
        must rely on the ``step`` arguments rather than count calls.
        """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        """Method-specific values to log with the step's metrics (JSON-serialisable)."""
        return {}


MIXERS: dict[str, type[Mixer]] = {}


def register(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: make a mixer available by ``name`` in configs and on the CLI."""

    def deco(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"mixer '{name}' registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return deco


def mixer_class(name: str) -> type[Mixer]:
    import mixlab.mixers  # noqa: F401 - importing the package registers every mixer

    if name not in MIXERS:
        raise ConfigError(
            f"unknown mixer '{name}'.{suggest(name, MIXERS)} Available: {', '.join(sorted(MIXERS))}."
        )
    return MIXERS[name]


def build_mixer(name: str, options: dict[str, Any], ctx: MixerContext) -> Mixer:
    """Build mixer ``name`` with ``options`` checked against its ``Config`` dataclass."""
    cls = mixer_class(name)
    config = from_dict(cls.Config, options, where=f"mixer.{name}")
    return cls(config, ctx)


def mixer_config_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(mixer_class(name).Config)]


# ---------------------------------------------------------------------------------------------
# Small pure helpers shared by update rules.


def check_distribution(p: np.ndarray, what: str = "weights", atol: float = 1e-6) -> np.ndarray:
    """Return ``p`` as float64 if it is a distribution (finite, >= 0, sums to 1), else raise."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ConfigError(f"{what} must be a non-empty vector, got shape {p.shape}.")
    if not np.all(np.isfinite(p)):
        raise ConfigError(f"{what} contain NaN or infinity: {p.tolist()}.")
    if np.any(p < 0):
        raise ConfigError(f"{what} must be non-negative: {p.tolist()}.")
    if abs(p.sum() - 1.0) > atol:
        raise ConfigError(f"{what} must sum to 1, they sum to {p.sum():.6g}.")
    return p


def normalize(x: np.ndarray) -> np.ndarray:
    """x / sum(x) for non-negative x; uniform when the sum is 0 or not finite."""
    x = np.asarray(x, dtype=np.float64)
    s = x.sum()
    if not np.isfinite(s) or s <= 0:
        return np.full(x.shape, 1.0 / x.size)
    return x / s


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a 1-D array (never NaN for finite input)."""
    z = np.asarray(z, dtype=np.float64)
    z = z - np.max(z)
    e = np.exp(z)
    return e / e.sum()


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """Mix ``p`` with uniform so every entry is at least ``floor`` (0 <= floor <= 1/m)."""
    m = p.size
    if floor <= 0:
        return p
    if floor * m > 1 + 1e-12:
        raise ConfigError(f"floor {floor} is above 1/m = {1 / m:.4g}.")
    lo = p.min()
    if lo >= floor:
        return p
    lam = (floor - lo) / (1.0 / m - lo)
    return (1 - lam) * p + lam / m


def resolve_plan(plan: Plan, m: int, apply: str = "sample", mixer: str = "") -> Plan:
    """A mixer's plan, validated, with the run's ``apply`` mode applied.

    ``weights`` must be a distribution over the m domains; a plan with ``counts`` records the
    mixture it trains (``counts / counts.sum()``). With ``apply = "loss"``, a plain sampling
    plan becomes uniform sampling with loss weights equal to the plan's weights.
    """
    weights = check_distribution(plan.weights, f"mixer '{mixer}' weights")
    if weights.size != m:
        raise ConfigError(f"mixer '{mixer}' planned {weights.size} weights for {m} domains.")
    if plan.counts is not None:
        counts = np.asarray(plan.counts)
        weights = counts / counts.sum()
    if apply == "loss" and plan.loss_weights is None and plan.counts is None:
        return Plan(weights=np.full(m, 1.0 / m), loss_weights=weights, phase=plan.phase)
    return Plan(weights=weights, counts=plan.counts, loss_weights=plan.loss_weights, phase=plan.phase)


def loss_factors(plan: Plan) -> np.ndarray | None:
    """[m] per-domain loss multipliers w_d / q_d (0 where q_d = 0), or None when the plan does
    not re-weight the loss (w = ``loss_weights``, q = ``weights``, the sampling distribution)."""
    if plan.loss_weights is None:
        return None
    w = check_distribution(plan.loss_weights, "loss weights")
    q = np.asarray(plan.weights, dtype=np.float64)
    return np.divide(w, q, out=np.zeros_like(w), where=q > 0)
