"""The mixing session: everything between a training loop and a mixer, for any loop.

A ``MixingSession`` owns the mixer, the training and auxiliary samplers, the repetition
budget, the eval and target sets, the reference model, per-sample weighting (DWM), the
signals, plan resolution, loss factors and the gather-then-observe step, with their state.
The loop that drives it owns the model, the optimizer and the schedule, and hands the session
only a narrow view of them (``RunView``). Driving it is a few calls per optimizer step::

    st = session.begin_step(step, micro_batches)   # plan, this rank's batch, loss factors
    for k in range(micro_batches):
        x = st.tokens(k)                            # [micro, T+1]
        losses = per-sample losses of model(x[:, :-1]) against x[:, 1:]         # [micro]
        loss = session.loss(st, k, losses)          # Σ f_i w_i ℓ_i / b, the scalar to backward
        loss.backward()                             # (the driver's DDP reduces on the last one)
    session.before_optimizer_step(st)               # DWM's bi-level update reads .grad
    clip, optimizer.step()
    result = session.end_step(st)                   # gather, observe; None-free on every rank

``mixlab train`` (``train.loop.Trainer``), the Hugging Face callback (``integrations.hf``) and a
loop of the user's own (``examples/own_loop.py``) all drive this one class, so every method
and signal has one implementation. The session imports nothing from ``train.loop``.

Capabilities: a driver states what it can give (``RunView.provides``) and a mixer what it
needs (``Mixer.needs``); a mixer that needs more than the driver gives is refused when the
session is built, with the missing capability named (``CAPABILITIES``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mixlab.config import from_dict
from mixlab.data.budget import RepetitionBudget
from mixlab.data.format import DataDir
from mixlab.data.sampler import Batch, MixtureSampler
from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import (
    MixerContext,
    Plan,
    build_mixer,
    check_distribution,
    loss_factors,
    mixer_class,
    resolve_plan,
)
from mixlab.model import per_sample_loss
from mixlab.train.config import TrainConfig
from mixlab.train.distributed import (
    DistInfo,
    all_gather_array,
    all_reduce_sum,
    average_gradients,
    check_same_on_all_ranks,
)
from mixlab.train.evaluate import EvalSet, loss_report, mean_losses
from mixlab.train.signals import StepSignals
from mixlab.train.target import TargetSet, load_target
from mixlab.train.weighting import RunWeighting
from mixlab.weighting.base import weighter_class

AUX_SEED_OFFSET = 1_000_003
"""The auxiliary (measurement) stream is seeded ``seed + AUX_SEED_OFFSET``."""
BRANCH_SEED_STRIDE = 7919
"""Branch k of ``branch_eval_deltas`` reads a stream seeded ``seed + BRANCH_SEED_STRIDE * (k+1)``,
plus ``stream * BRANCH_STREAM_STRIDE`` when the caller asks for another stream."""
BRANCH_STREAM_STRIDE = 2**32
"""Stream s > 0 of the branches lies in its own block of seeds, above every seed < 2**32, so it
meets neither the run's streams nor another stream's."""

CAPABILITIES: dict[str, str] = {
    "full_model": "the whole, unsharded parameters on every rank (per-sample alignments, "
    "per-domain gradients, DWM's bi-level update)",
    "branches": "copies of the model and its optimizer trained on the side (Skill-It's graph)",
}
"""What a driver may provide, with what it is for."""

DEFAULT_PROVIDES = frozenset(CAPABILITIES)


def merge_config(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s tables merged in, key by key (``top`` wins)."""
    out = dict(base)
    for k, v in top.items():
        both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
        out[k] = merge_config(out[k], v) if both else v
    return out


def config_for(
    data: str | Path, *, steps: int, batch_size: int, seq_len: int, seed: int = 0,
    mixer: str = "stratified", mixer_options: Mapping[str, Any] | None = None,
    apply: str = "sample", grad_accum: int = 1, domains: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None, where: str = "mixing session",
) -> TrainConfig:
    """The ``mixlab train`` config of a run driven by another loop: the arguments, over any
    other sections in ``extra`` (``target``, ``eval``, ``weighting``, ``data.max_epochs``...)."""
    mine: dict[str, Any] = {
        "data": {"dir": str(data), "seq_len": seq_len,
                 **({"domains": list(domains)} if domains is not None else {})},
        "train": {"steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed,
                  "progress": False},
        "mixer": {"name": mixer, "apply": apply, "options": dict(mixer_options or {})},
    }
    return from_dict(TrainConfig, merge_config(dict(extra or {}), mine), where=where)


def refuse_missing(subject: str, needs: frozenset[str], provides: frozenset[str], hint: str = "",
                   why: str = "") -> None:
    """Raise one ConfigError when ``subject`` (a mixer or weighter, as the user named it) needs
    capabilities the driver does not provide, naming each missing one (``CAPABILITIES``)."""
    missing = sorted(needs - provides)
    if missing:
        raise ConfigError(
            f"{subject} needs {'; '.join(CAPABILITIES[c] for c in missing)}, which this way of "
            f"training does not provide{why}; train it with `mixlab train` (train.parallel = "
            f"'ddp') or a driver that provides it{', ' + hint if hint else ''}."
        )


def check_weighter_needs(cfg: TrainConfig, provides: frozenset[str]) -> None:
    """Refuse a weighter that needs a capability the driver does not provide (``Weighter.needs_for``)."""
    cls = weighter_class(cfg.weighting.name)
    refuse_missing(f"weighting.name = '{cfg.weighting.name}'", cls.needs_for(cfg.weighting.weighter_config()),
                   provides, cls.needs_hint, " (under train.parallel = 'fsdp' each rank holds a shard)")


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    """Refuse a global batch that does not split into equal micro-batches on every rank."""
    t = cfg.train
    if t.batch_size % (world_size * t.grad_accum):
        raise ConfigError(
            f"train.batch_size {t.batch_size} must be divisible by world size x grad_accum "
            f"= {world_size * t.grad_accum}."
        )


def copy_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, copy_of: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of ``optimizer``'s class and hyperparameters over ``copy_of``'s parameters
    (a ``copy.deepcopy`` of ``model``), holding a copy of its state: the same param groups in
    the same order, so the next step of the copy is the step the original would take."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(copy_of.parameters())
    groups = []
    for g in inner.param_groups:
        try:
            mapped = [params[index[id(p)]] for p in g["params"]]
        except KeyError:
            raise ConfigError("the optimizer holds parameters that are not the model's; "
                              "branch copies need an optimizer over the model handed to mixlab.") from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mapped})
    # Only the defaults the constructor takes (AdamW's carry Adam's decoupled_weight_decay); the
    # groups hold every hyperparameter anyway.
    accepted = inspect.signature(type(inner).__init__).parameters
    out = type(inner)(groups, **{k: v for k, v in inner.defaults.items() if k in accepted})
    out.load_state_dict(copy.deepcopy(inner.state_dict()))
    return out


@dataclass
class RunView:
    """The narrow view of a run a driver hands the session."""

    model: nn.Module
    """The bare model (no DDP wrapper), ``forward(idx [b, T]) -> logits [b, T, V]``, identical
    on every rank. Signals run it in eval mode and restore its mode."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistInfo = field(default_factory=DistInfo)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    optimizer: torch.optim.Optimizer | None = None
    """Needed by signals that read the optimizer (Adam preconditioning) and by branch copies."""
    lr_at: Callable[[int], float] | None = None
    """The learning rate of 0-based step t; None reads the optimizer's current one."""
    mean_losses: Callable[..., dict[str, float]] = mean_losses
    """How eval losses are computed (``train.evaluate.mean_losses`` signature)."""
    provides: frozenset[str] = DEFAULT_PROVIDES
    new_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None
    """Builds a fresh optimizer for a branch copy; None copies ``optimizer`` (``copy_optimizer``)."""


@dataclass
class ActiveStep:
    """One optimizer step in progress (``begin_step`` → ``end_step``) on this rank."""

    step: int
    plan: Plan
    batch: Batch
    """This rank's slice of the global batch: tokens [b, T+1]."""
    factors: torch.Tensor | None
    """[b] float32 loss multipliers w/q of each sample's domain, or None."""
    micro: int
    """Samples per micro-batch."""
    lr: float
    losses: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    token_losses: list[torch.Tensor] = field(default_factory=list)
    loss_sum: float = 0.0

    def tokens(self, k: int) -> torch.Tensor:
        """[micro, T+1] micro-batch ``k`` of this rank's slice (CPU)."""
        return self.batch.tokens[k * self.micro:(k + 1) * self.micro]


@dataclass(frozen=True)
class StepResult:
    """A finished step as every rank sees it."""

    loss: float
    """Mean (weighted) loss over the global batch."""
    sample_losses: np.ndarray
    """[B] unweighted per-sample losses, gathered in rank order."""
    domains: np.ndarray
    """[B] their domain indices."""


class MixingSession:
    """Mixing for one run; see the module docstring for how a loop drives it."""

    def __init__(self, cfg: TrainConfig, run: RunView, data: DataDir | None = None,
                 reference: nn.Module | None = None):
        """``reference``: a reference model given as a module (in place of
        ``mixer.reference``, a run dir), with the run model's contract; kept in eval mode."""
        self.cfg = cfg
        self.run = run
        t = cfg.train
        self.dist = run.dist
        self.rank, self.world = run.dist.rank, run.dist.world_size
        self.data = data or DataDir.open(cfg.data.dir)
        self.domains = list(cfg.data.domains) or self.data.domains
        for d in self.domains:
            self.data.manifest.domain(d)  # clear error for an unknown domain
        self.m = len(self.domains)
        seq = cfg.data.seq_len
        check_batch(cfg, self.world)
        mixer_cls = mixer_class(cfg.mixer.name)
        mixer_cfg = from_dict(mixer_cls.Config, cfg.mixer.options, where="mixer.options")
        refuse_missing(f"mixer '{cfg.mixer.name}'", mixer_cls.needs_for(mixer_cfg), run.provides,
                       mixer_cls.needs_hint)
        if cfg.weighting.enabled:
            check_weighter_needs(cfg, run.provides)
        self.train_tokens = np.array(
            [self.data.split(d, "train").n_tokens for d in self.domains], dtype=np.int64
        )
        self.sampler = MixtureSampler(
            self.data, "train", seq, t.batch_size, t.seed, self.rank, self.world, self.domains
        )
        # data.max_epochs: a per-domain repetition budget applied in plan() (None = none).
        self.budget = RepetitionBudget.from_config(
            cfg.data.max_epochs, cfg.data.budget_pace, self.domains, self.sampler.n_windows,
            t.steps, t.batch_size,
        )
        # A second, independent data stream for batches a method draws to *measure* something
        # (alignment probes, ...): it never moves the training stream, and it is checkpointed.
        self.aux_sampler = MixtureSampler(
            self.data, "train", seq, t.batch_size, t.seed + AUX_SEED_OFFSET, self.rank,
            self.world, self.domains,
        )
        self.ctx = MixerContext(
            domains=self.domains, train_tokens=self.train_tokens, total_steps=t.steps,
            batch_size=t.batch_size, seq_len=seq, seed=t.seed,
        )
        self.mixer = build_mixer(cfg.mixer.name, cfg.mixer.options, self.ctx)
        e = cfg.eval
        self.val_set = EvalSet.from_data(self.data, self.domains, "val", e.windows, seq, t.seed)
        self.signal_set = EvalSet.from_data(
            self.data, self.domains, "val", e.signal_windows, seq, t.seed + 1
        )
        self.target: TargetSet | None = load_target(cfg.target, self.data, seq, t.seed)
        self.reference: nn.Module | None = None if reference is None else reference.to(run.device).eval()
        if cfg.mixer.reference and reference is None:
            from mixlab.train.checkpoint import load_run_model

            self.reference = load_run_model(cfg.mixer.reference, self.data).to(run.device).eval()
        # Per-sample weighting inside each batch ([weighting] name), on top of the mixer's sampling.
        self.weighting = RunWeighting(self) if cfg.weighting.enabled else None
        self.extra_steps = 0
        self._started = False
        self._eval_cache: dict[tuple[str, int], Any] = {}

    @classmethod
    def for_loop(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        data: str | Path | DataDir,
        steps: int,
        batch_size: int,
        seq_len: int,
        mixer: str = "stratified",
        mixer_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        micro_batches: int = 1,
        domains: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        dist: DistInfo | None = None,
        lr_at: Callable[[int], float] | None = None,
        reference: nn.Module | None = None,
    ) -> MixingSession:
        """A session for a loop of the user's own (``examples/own_loop.py``).

        ``model``: ``forward(idx [b, T]) -> logits [b, T, V]`` (a transformers model: wrap it
        with ``mixlab.model.hf.HFCausalLM.view``), on ``device`` (default: its parameters').
        ``optimizer``: the run's, for signals that read it and for branch copies (Skill-It).
        ``batch_size`` is global (all ranks); ``micro_batches`` the accumulation steps per
        optimizer step. ``config``: other sections of a ``mixlab train`` config (``target``,
        ``eval``, ``weighting``, ``data.max_epochs``, ``optim.grad_clip`` for branches...).
        ``dist`` defaults to the initialised process group, if any. ``lr_at(t)``: the
        learning rate of step t; default: the optimizer's when asked.
        """
        root = data.root if isinstance(data, DataDir) else Path(data)
        cfg = config_for(root, steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                         mixer=mixer, mixer_options=mixer_options, grad_accum=micro_batches,
                         domains=domains, extra=config)
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        view = RunView(
            model=model, device=dev, dist=dist or DistInfo.from_process_group(dev),
            autocast=autocast or contextlib.nullcontext, optimizer=optimizer, lr_at=lr_at,
        )
        return cls(cfg, view, data if isinstance(data, DataDir) else None, reference=reference)

    @property
    def step(self) -> int:
        """The next step to train (0 on a fresh run; the checkpoint's step after a resume)."""
        return self.sampler.step

    # ---------------------------------------------------------------- the view, for signals

    @property
    def model(self) -> nn.Module:
        return self.run.model

    @property
    def provides(self) -> frozenset[str]:
        return self.run.provides

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.run.optimizer

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager]:
        return self.run.autocast

    @property
    def wants_token_losses(self) -> bool:
        """True when the mixer reads the per-token losses of the training forward (DoReMi):
        pass them to ``loss``."""
        return bool(getattr(self.mixer, "wants_token_losses", False))

    def learning_rate(self, step: int) -> float:
        """The learning rate of 0-based step ``step`` (the driver's schedule)."""
        if self.run.lr_at is not None:
            return float(self.run.lr_at(step))
        if self.optimizer is None:
            raise ConfigError("this signal needs the learning rate: give the session the optimizer or lr_at.")
        return float(getattr(self.optimizer, "optimizer", self.optimizer).param_groups[0]["lr"])

    # ---------------------------------------------------------------- the step

    def plan(self, step: int) -> Plan:
        """The mixer's plan for ``step``, validated, with ``mixer.apply`` and the repetition
        budget applied: what is sampled, logged and trained."""
        plan = resolve_plan(self.mixer.plan(step), self.m, self.cfg.mixer.apply, self.cfg.mixer.name)
        if self.budget is None:
            return plan
        # The budget's state is the sampler's (checkpointed) drawn counts: a resumed run
        # projects identically.
        return self.budget.apply(plan, self.sampler.windows_drawn, self.sampler.step)

    def begin_step(self, step: int, micro_batches: int = 1) -> ActiveStep:
        """Plan step ``step`` and draw this rank's slice of its global batch, to be trained in
        ``micro_batches`` equal micro-batches."""
        if not self._started:  # a fresh run: the mixer sees the initial model first
            self.start()
        plan = self.plan(step)
        if self.cfg.train.check_ranks:
            check_same_on_all_ranks(plan.weights, "mixture weights", step, self.dist)
        if plan.counts is not None:
            batch = self.sampler.next_batch(counts=np.asarray(plan.counts, dtype=np.int64))
        else:
            batch = self.sampler.next_batch(weights=plan.weights)
        per_domain = loss_factors(plan)
        factors = None if per_domain is None else torch.as_tensor(per_domain, dtype=torch.float32)[batch.domains]
        lr = self.learning_rate(step) if (self.run.lr_at is not None or self.optimizer is not None) else float("nan")
        return ActiveStep(step, plan, batch, factors, batch.tokens.shape[0] // micro_batches, lr)

    def loss(self, st: ActiveStep, k: int, losses: torch.Tensor,
             token_losses: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar to backward for micro-batch ``k``: Σ_i f_i w_i ℓ_i / b over its samples,
        ``losses`` [micro] their per-sample losses (with the graph), f_i the plan's loss factor
        and w_i the weighting model's weight; b is this rank's slice, so the micro-batches add up
        to the rank's mean and DDP's average is the global batch's. ``token_losses`` [micro, T]
        (detached is enough) when ``wants_token_losses``."""
        sl = slice(k * st.micro, (k + 1) * st.micro)
        weighted = losses if st.factors is None else losses * st.factors[sl].to(losses.device)
        if self.weighting is not None:
            sw = self.weighting.micro_weights(st.step, st.batch.tokens[sl], st.batch.domains[sl], losses.detach())
            weighted = weighted * sw
            st.weights.append(sw.detach().cpu())
        loss = weighted.sum() / st.batch.tokens.shape[0]
        st.losses.append(losses.detach().float().cpu())
        if token_losses is not None:
            st.token_losses.append(token_losses.detach().float().cpu())
        st.loss_sum += float(loss.detach())
        return loss

    def before_optimizer_step(self, st: ActiveStep) -> None:
        """Call after the last backward, before clipping and the optimizer step: the weighting
        model's bi-level update reads the LM's gradient (``.grad``, reduced over ranks)."""
        w = self.weighting
        if w is not None and w.trains_at(st.step):
            w.update(st.step, st.batch, torch.cat(st.losses), st.factors, st.lr, st.micro)

    def end_step(self, st: ActiveStep) -> StepResult:
        """Gather the step's losses and domains over ranks (a collective: every rank calls it)
        and let the mixer observe it. Not called for a step whose update was skipped."""
        loss = float(all_reduce_sum(np.array([st.loss_sum]), self.dist)[0]) / self.world
        losses_all = all_gather_array(torch.cat(st.losses).numpy(), self.dist)
        domains_all = all_gather_array(st.batch.domains.numpy(), self.dist)
        if self.weighting is not None:
            self.weighting.record(st.step, st.batch, domains_all, torch.cat(st.weights))
        tok = torch.cat(st.token_losses) if self.wants_token_losses and st.token_losses else None
        self.mixer.observe(st.step, StepSignals(st.step, self, losses_all, domains_all, st.batch.tokens,
                                                token_losses=tok, lr=st.lr))
        return StepResult(loss, losses_all, domains_all)

    def start(self) -> None:
        """Call once before the first step of a fresh run (not on resume); ``begin_step`` calls
        it when nobody has."""
        self._started = True
        self.mixer.start(StepSignals(-1, self, None, None, None))

    def report(self, step: int) -> dict[str, Any]:
        """The mixer's and the weighting model's own values for the log (JSON-serialisable)."""
        out: dict[str, Any] = {}
        if mixer_report := self.mixer.report():
            out["mixer"] = mixer_report
        if self.weighting is not None:
            out["weighting"] = self.weighting.report(step)
        return out

    # ---------------------------------------------------------------- signals

    def _mean_losses(self, model: nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.run.mean_losses(model, windows, self.cfg.eval.batch_size, self.device,
                                    self.autocast, self.dist)

    def signal_eval_losses(self, step: int) -> np.ndarray:
        key = ("signal", step)
        if key not in self._eval_cache:
            losses = self._mean_losses(self.model, self.signal_set.windows)
            self._eval_cache = {k: v for k, v in self._eval_cache.items() if k[1] == step}
            self._eval_cache[key] = np.array([losses[d] for d in self.domains])
        return self._eval_cache[key].copy()

    def target_probe_loss(self, step: int) -> float:
        if self.target is None:
            raise ConfigError("this mixer needs a target set: set target.path or target.domain.")
        key = ("target", step)
        if key not in self._eval_cache:
            self._eval_cache[key] = self._mean_losses(self.model, {"t": self.target.probe})["t"]
        return float(self._eval_cache[key])

    @torch.no_grad()
    def reference_sample_losses(self, tokens: torch.Tensor) -> np.ndarray:
        if self.reference is None:
            raise ConfigError(
                f"mixer '{self.cfg.mixer.name}' needs a reference model: set mixer.reference to a "
                "finished run dir (e.g. a stratified run)."
            )
        with self.autocast():
            local = per_sample_loss(self.reference, tokens.to(self.device)).float().cpu().numpy()
        return all_gather_array(local, self.dist)

    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int, step: int,
                           lr: float | None = None, counts: np.ndarray | None = None,
                           stream: int = 0) -> np.ndarray:
        """Train a copy of the model and optimizer per mixture for ``steps`` steps at learning
        rate ``lr`` (default: the schedule's at ``step``); return the drops [k, m] of the
        mixer-eval losses (``step``'s cached ones are the baseline). ``counts`` [k, m]: exact
        per-batch compositions of the branches (in place of drawing from ``mixtures``);
        ``stream``: which seeded data windows the branches read (``BRANCH_STREAM_STRIDE``)."""
        if "branches" not in self.run.provides:
            raise ConfigError(f"mixer '{self.cfg.mixer.name}' trains branch copies of the model: "
                              f"this driver does not provide {CAPABILITIES['branches']}.")
        if self.optimizer is None and self.run.new_optimizer is None:
            raise ConfigError("branch copies need the optimizer: give the session the run's optimizer.")
        if counts is not None:
            counts = np.asarray(counts, dtype=np.int64)
            if counts.shape != np.shape(mixtures):
                raise ConfigError(f"branch counts have shape {counts.shape}, the mixtures "
                                  f"{np.shape(mixtures)}.")
        if int(stream) < 0:
            raise ConfigError(f"branch stream must be >= 0, got {stream}.")
        base_losses = self.signal_eval_losses(step)
        out = np.zeros_like(mixtures)
        lr = self.learning_rate(max(0, step)) if lr is None else lr
        t = self.cfg.train
        for k, mix in enumerate(mixtures):
            branch = copy.deepcopy(self.model)
            if self.run.new_optimizer is not None:
                opt = self.run.new_optimizer(branch)
                if self.optimizer is not None:
                    opt.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
            else:
                opt = copy_optimizer(self.optimizer, self.model, branch)  # type: ignore[arg-type]
            # A separate data stream, so branches never move the main run's data order.
            sampler = MixtureSampler(
                self.data, "train", self.cfg.data.seq_len, t.batch_size,
                t.seed + BRANCH_SEED_STRIDE * (k + 1) + BRANCH_STREAM_STRIDE * int(stream),
                self.rank, self.world, self.domains,
            )
            for group in opt.param_groups:
                group["lr"] = lr
            for _ in range(steps):
                batch = (
                    sampler.next_batch(weights=check_distribution(mix, "branch mixture"))
                    if counts is None else sampler.next_batch(counts=counts[k])
                )
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = per_sample_loss(branch, batch.tokens.to(self.device)).mean()
                loss.backward()
                average_gradients(branch, self.dist)
                if self.cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(branch.parameters(), self.cfg.optim.grad_clip)
                opt.step()
            after = mean_losses(branch, self.signal_set.windows, self.cfg.eval.batch_size,
                                self.device, self.autocast, self.dist)
            out[k] = base_losses - np.array([after[d] for d in self.domains])
        self.extra_steps += steps * len(mixtures)
        return out

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, split: str = "val") -> dict[str, Any]:
        """Per-domain (and target) losses and perplexities of the model on ``split``."""
        e = self.cfg.eval
        if split == "val":
            windows = dict(self.val_set.windows)
        else:
            windows = EvalSet.from_data(
                self.data, self.domains, split, e.test_windows, self.cfg.data.seq_len, self.cfg.train.seed
            ).windows
        if self.target is not None:
            windows["__target__"] = self.target.eval
        losses = self._mean_losses(self.model, windows)
        return loss_report(losses, self.domains, losses.get("__target__"))

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Samplers, mixer, weighting model and counters: plain values and tensors (loads with
        ``torch.load(weights_only=True)``); the same on every rank."""
        return {
            "sampler": self.sampler.state_dict(),
            "aux_sampler": self.aux_sampler.state_dict(),
            "mixer": self.mixer.state_dict(),
            "extra_steps": self.extra_steps,
            **({"weighting": self.weighting.state_dict()} if self.weighting is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._started = True  # a resumed run's mixer has started already
        self.sampler.load_state_dict(state["sampler"])
        self.aux_sampler.load_state_dict(state["aux_sampler"])
        self.mixer.load_state_dict(state["mixer"])
        self.extra_steps = int(state.get("extra_steps", 0))
        if self.weighting is not None:
            if "weighting" not in state:
                raise CheckpointError("the checkpoint has no weighting model state; it was written by a run without weighting.")
            self.weighting.load_state_dict(state["weighting"])

    def save_weighting(self, out_dir: str | Path) -> None:
        """Write OUT/dwm.safetensors and OUT/dwm.json when the run trains a weighting model."""
        if self.weighting is not None:
            self.weighting.save(Path(out_dir))
