"""Any mixlab mixer inside the Hugging Face ``transformers.Trainer``, without subclassing it.

Usage (the whole of it)::

    from mixlab.integrations.hf import MixlabCallback

    mixlab = MixlabCallback("data/builtin", mixer="odm", seq_len=128)
    trainer = Trainer(
        model=model,                            # any transformers causal LM
        args=TrainingArguments(..., max_steps=1000),
        train_dataset=mixlab.train_dataset,
        compute_loss_func=mixlab.compute_loss,
        callbacks=[mixlab],
    )
    trainer.train()                             # or trainer.train(resume_from_checkpoint=True)

With ``b = per_device_train_batch_size``, ``GA = gradient_accumulation_steps`` and ``W`` processes,
one optimizer step trains on a global batch of ``B = b * GA * W`` windows of ``seq_len + 1``
tokens, exactly as ``mixlab train`` does::

    on_step_begin(t)   plan = mixer.plan(t); every rank draws the global batch of step t from a
                       MixtureSampler (exact per-domain counts for probe plans) and keeps its
                       disjoint slice [b * GA, seq_len + 1]
    forward k < GA     a forward pre-hook on the model puts micro-batch k of that slice
                       (tokens[:, :-1]) in place of the placeholder ``input_ids``
    compute_loss       per-sample next-token cross-entropy [b] from the logits and the targets
                       tokens[:, 1:], times w_d / q_d when the plan re-weights the loss,
                       summed and divided by b * GA (DDP then averages over ranks)
    on_step_end(t)     per-sample losses and domains gathered in rank order; unless a loss was
                       NaN/inf, mixer.observe(t, signals), where eval losses are computed only
                       if the mixer asks for them
    on_save            mixlab_state.pt (sampler and mixer state) written atomically into the
                       checkpoint folder; loaded again by ``train(resume_from_checkpoint=...)``

Why the dataset holds placeholders and the tokens come in through a hook: ``accelerate`` wraps
the Trainer's dataloader in a ``DataLoaderShard``/``DataLoaderDispatcher`` that always fetches
one batch ahead (to know which batch is the last), and the Trainer fetches all micro-batches
of a step before training the first. So the first micro-batch of step t+1 is built before step
t is trained, let alone observed: any dataset that drew real tokens when the dataloader asked
would train every step's first micro-batch on the previous plan. Here the dataloader only
yields placeholders (``input_ids`` -1, ``labels`` -100, which no model can train on by
accident), and the batch of step t is drawn in ``on_step_begin(t)``, after ``observe(t - 1)``.
As a consequence prefetching cannot go wrong: ``dataloader_num_workers``,
``dataloader_prefetch_factor`` and accelerate's dispatching may take any value, and
``ignore_data_skip`` does not change the data order on resume (the order comes from the
sampler's state in ``mixlab_state.pt``; ``ignore_data_skip=True`` only saves iterating over
the placeholders of the steps already trained).

Signals a mixer may ask for: ``train_losses``, ``train_counts``, ``eval_losses`` (a fixed,
seeded subset of each domain's validation split, ``eval_windows`` per domain, the seed
``seed + 1`` as in ``mixlab train``), ``reference_losses`` (with ``reference_model``) and
``learning_rate``. The others (target set, branch training, gradient alignments, cluster
hierarchy) raise a ``ConfigError`` naming the method and the alternative (``mixlab train``
trains HF models too); the built-in mixers that need them (Skill-It, DGA, DoGE) are refused
when the callback is built.

Differences from ``mixlab train`` that come from the Trainer: the Trainer applies the update of
a step whose loss is NaN/inf (the mixer still never observes it, and ``nonfinite_steps``
counts it); the learning rate, optimizer and clipping are the Trainer's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from mixlab.config import from_dict
from mixlab.data.format import DataDir
from mixlab.data.sampler import Batch, MixtureSampler
from mixlab.errors import CheckpointError, ConfigError, MixlabError
from mixlab.mixers.base import (
    Mixer,
    MixerContext,
    Plan,
    build_mixer,
    loss_factors,
    mixer_class,
    resolve_plan,
)
from mixlab.mixers.doremi import clipped_token_excess
from mixlab.model import sequence_losses
from mixlab.model import token_losses as per_token_cross_entropy
from mixlab.model.hf import require_transformers
from mixlab.train.checkpoint import to_plain
from mixlab.train.distributed import (
    DistInfo,
    all_gather_array,
    all_reduce_sum,
    check_same_on_all_ranks,
)
from mixlab.train.evaluate import EvalSet
from mixlab.train.signals import per_domain_mean
from mixlab.weighting.config import WeightingConfig
from mixlab.weighting.dwm import DataWeighter, load_net

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from mixlab.signals.alignment import SampleAlignments

_transformers = require_transformers()
TrainerCallback = _transformers.TrainerCallback

STATE_FILE = "mixlab_state.pt"
"""Name of the file ``on_save`` writes into each Trainer checkpoint folder."""
STATE_VERSION = 1
"""Version of the dict in ``STATE_FILE``."""
INPUT_PLACEHOLDER = -1
"""Value of every placeholder ``input_ids`` entry: not a token id, so a model fed a placeholder
fails loudly instead of training on it."""
LABEL_PLACEHOLDER = -100
"""Value of every placeholder ``labels`` entry: the ignore index of every HF loss."""
SIGNAL_SEED_OFFSET = 1
"""The eval-signal subset is seeded with ``seed + 1``, as ``mixlab train``'s ``signal_set``."""

UNSUPPORTED_MIXERS: dict[str, str] = {
    "skillit": "branch_eval_deltas (training copies of the model to learn its skills graph)",
    "dga": "sample_alignments (per-sample gradient alignments with a target set)",
    "doge": "sample_alignments or domain_gradient_gram (per-domain gradients, one backward each)",
}
"""Built-in mixers that ask for a signal this integration cannot compute, refused when the
callback is built rather than at the first step that asks."""


def _unsupported(signal: str, mixer: str) -> ConfigError:
    return ConfigError(
        f"mixer '{mixer}' asked for signals.{signal}(), which the Hugging Face Trainer "
        "integration does not provide (it provides train_losses, train_counts, eval_losses, "
        "reference_losses with reference_model=..., and learning_rate). Train this method with "
        "`mixlab train` instead: model.kind = 'hf' trains any transformers causal LM."
    )


# ---------------------------------------------------------------------------------------------
# Pure helpers.


per_sample_cross_entropy = sequence_losses
"""Mean next-token cross-entropy per sample from logits (``mixlab.model.sequence_losses``)."""


def _ranks_from_args(args: Any) -> DistInfo:
    """The Trainer's processes as a ``DistInfo`` (collectives on its device under NCCL)."""
    if int(args.world_size) <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise MixlabError(
            f"TrainingArguments report {args.world_size} processes but torch.distributed is not "
            "initialised; launch with torchrun or accelerate launch."
        )
    return DistInfo.from_process_group(args.device)


# ---------------------------------------------------------------------------------------------
# The dataset the Trainer iterates.


class MixtureSlots(IterableDataset):
    """An endless stream of placeholder samples; ``MixlabCallback`` fills them at forward time.

    Each item is ``{"input_ids": LongTensor [seq_len] of -1, "labels": LongTensor [seq_len] of
    -100}``. The Trainer batches them into [b, seq_len] micro-batches like any dataset; the
    callback's forward pre-hook replaces ``input_ids`` by the real tokens of the step's batch,
    and ``compute_loss`` ignores the placeholder labels. It has no length: set ``max_steps``.
    """

    def __init__(self, seq_len: int):
        super().__init__()
        self.seq_len = seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ids = torch.full((self.seq_len,), INPUT_PLACEHOLDER, dtype=torch.long)
        labels = torch.full((self.seq_len,), LABEL_PLACEHOLDER, dtype=torch.long)
        while True:
            yield {"input_ids": ids.clone(), "labels": labels.clone()}


def _find_slots(dataloader: Any) -> MixtureSlots | None:
    """The ``MixtureSlots`` under the Trainer's (accelerate-wrapped) dataloader, if any."""
    obj = getattr(dataloader, "dataset", None)
    for _ in range(4):  # IterableDatasetShard and friends keep the original in ``.dataset``
        if isinstance(obj, MixtureSlots) or obj is None:
            return obj
        obj = getattr(obj, "dataset", None)
    return None


# ---------------------------------------------------------------------------------------------
# Per-step bookkeeping and signals.


@dataclass(frozen=True)
class StepLog:
    """What one optimizer step trained on (one entry of ``MixlabCallback.history``)."""

    step: int
    """0-based optimizer step."""
    phase: str
    """The plan's label ('train', 'probe', 'prior', ...)."""
    weights: np.ndarray
    """[m] the sampling distribution of the step (``counts / B`` for exact plans)."""
    counts: np.ndarray | None
    """[m] the exact composition the plan asked for, or None for i.i.d. sampling."""
    drawn: np.ndarray
    """[m] int64 samples of each domain in the global batch actually drawn."""
    loss_weights: np.ndarray | None
    """[m] the plan's loss weights w (the loss of domain d was multiplied by w_d / q_d)."""
    loss: float
    """Mean over the global batch of the (weighted) per-sample losses: the loss trained on."""
    domain_losses: np.ndarray
    """[m] mean unweighted per-sample loss per domain; NaN for a domain with no sample."""
    observed: bool
    """False when a loss was NaN/inf and the mixer did not observe the step."""


@dataclass
class _ActiveStep:
    """The optimizer step in progress on this rank."""

    step: int
    plan: Plan
    batch: Batch
    """This rank's slice of the global batch: tokens [b * GA, seq_len + 1]."""
    factors: np.ndarray | None
    """[m] loss multipliers w/q, or None."""
    micro: int
    """Samples per micro-batch (per_device_train_batch_size)."""
    losses: list[torch.Tensor | None]
    """Detached per-sample losses [micro] of each micro-batch, filled by ``compute_loss``."""
    forwards: int = 0
    current: int | None = None
    """Index of the micro-batch whose forward ran and whose loss is not computed yet."""
    lr: float = float("nan")
    token_losses: list[torch.Tensor | None] | None = None
    """Detached per-token losses [micro, T] of each micro-batch, kept only for a mixer that
    asks for them (``wants_token_losses``: DoReMi's per-token excess)."""


class HFStepSignals:
    """``mixlab.mixers.base.Signals`` of one finished step of a Trainer run (lazy: the eval and
    reference passes run only when a mixer asks, at most once per step)."""

    def __init__(
        self,
        step: int,
        owner: MixlabCallback,
        sample_losses: np.ndarray | None,
        domains: np.ndarray | None,
        tokens: torch.Tensor | None,
        lr: float,
        token_losses: torch.Tensor | None = None,
    ):
        self.step = step
        self._owner = owner
        self._losses = sample_losses
        self._domains = domains
        self._tokens = tokens
        self._lr = lr
        self._token_losses = token_losses
        self._reference: np.ndarray | None = None
        self._excess: np.ndarray | None = None

    def train_losses(self) -> np.ndarray:
        m = self._owner.m
        if self._losses is None or self._domains is None:
            return np.full(m, np.nan)
        return per_domain_mean(self._losses, self._domains, m)

    def train_counts(self) -> np.ndarray:
        if self._domains is None:
            return np.zeros(self._owner.m, dtype=np.int64)
        return np.bincount(self._domains, minlength=self._owner.m)

    def eval_losses(self) -> np.ndarray:
        return self._owner.eval_losses(self.step)

    def reference_losses(self) -> np.ndarray:
        if self._reference is None:
            if self._tokens is None or self._domains is None:
                self._reference = np.full(self._owner.m, np.nan)
            else:
                ref = self._owner.reference_sample_losses(self._tokens)
                self._reference = per_domain_mean(ref, self._domains, self._owner.m)
        return self._reference.copy()

    def excess_losses(self) -> np.ndarray:
        """[m] per-domain mean over tokens of max(ℓ - ℓ_ref, 0), clipped per token (DoReMi,
        ``mixlab.train.signals.StepSignals.excess_losses``), with ℓ from the training forward."""
        if self._excess is None:
            if self._tokens is None or self._domains is None or self._token_losses is None:
                self._excess = np.full(self._owner.m, np.nan)
            else:
                ref = self._owner.reference_token_losses(self._tokens)
                local = clipped_token_excess(self._token_losses.numpy(), ref.numpy())
                gathered = all_gather_array(local, self._owner._ranks)
                self._excess = per_domain_mean(gathered, self._domains, self._owner.m)
        return self._excess.copy()

    def learning_rate(self) -> float:
        return self._lr

    def target_loss(self) -> float:
        raise _unsupported("target_loss", self._owner.mixer_name)

    def branch_eval_deltas(self, mixtures: np.ndarray, steps: int) -> np.ndarray:
        raise _unsupported("branch_eval_deltas", self._owner.mixer_name)

    def sample_alignments(
        self,
        counts: np.ndarray,
        direction: str = "target",
        method: str = "jvp",
        precondition: bool = False,
        probes: int = 0,
        target_windows: int = 0,
    ) -> SampleAlignments:
        raise _unsupported("sample_alignments", self._owner.mixer_name)

    def alignment(
        self,
        direction: str = "target",
        counts: np.ndarray | None = None,
        method: str = "jvp",
        precondition: bool = False,
    ) -> np.ndarray:
        raise _unsupported("alignment", self._owner.mixer_name)

    def target_histogram(self) -> np.ndarray:
        raise _unsupported("target_histogram", self._owner.mixer_name)

    def cluster_parents(self) -> np.ndarray:
        raise _unsupported("cluster_parents", self._owner.mixer_name)


# ---------------------------------------------------------------------------------------------
# The callback.


class MixlabCallback(TrainerCallback):
    """A mixlab mixer driving the data of a ``transformers.Trainer`` run.

    Pass ``train_dataset=cb.train_dataset``, ``compute_loss_func=cb.compute_loss`` and
    ``callbacks=[cb]`` to the Trainer (see the module docstring). The sampler and the mixer are
    built at ``on_train_begin``, when the batch size, world size and ``max_steps`` are known;
    afterwards ``cb.mixer``, ``cb.sampler`` and ``cb.history`` (one ``StepLog`` per step trained
    in this process) can be read.

    Arguments:
        data: a mixlab data dir (``mixlab prepare``) or its path.
        mixer: a registered mixer name (``mixlab train --list-mixers``).
        mixer_options: the mixer's options (its ``Config`` fields), checked now.
        seq_len: tokens per training sample (each window holds ``seq_len + 1`` tokens).
        domains: the domains to train on (default: all of the data dir), in ``[m]`` order.
        seed: seed of the data order, the evaluation subset and the mixer; default
            ``TrainingArguments.seed``.
        apply: ``"sample"`` samples by the mixture; ``"loss"`` samples uniformly and weights each
            sample's loss by w_d / q_d (``mixer.apply`` of ``mixlab train``).
        eval_windows: windows per domain of the validation subset behind ``eval_losses``.
        eval_batch_size: samples per forward of the eval and reference passes (default
            ``per_device_eval_batch_size``).
        reference_model: a trained model for ``reference_losses`` (DoReMi); moved to the
            training device and kept in eval mode.
        check_ranks: all-reduce a checksum of the mixture at every step and stop if ranks differ.
        resume_from: the checkpoint folder to read ``mixlab_state.pt`` from on resume, when it is
            not ``<output_dir>/checkpoint-<global_step>`` (a checkpoint of another output dir).
        weighting: a trained data weighting model (a ``mixlab train`` run dir with
            ``weighting.name = "dwm"``, or its ``dwm.safetensors``), used frozen: each sample's
            loss is also multiplied by its weight (mean 1 per micro-batch). Its tokenizer must be
            the data dir's. Training a weighting model bi-level needs ``mixlab train``.
    """

    def __init__(
        self,
        data: str | Path | DataDir,
        mixer: str = "stratified",
        mixer_options: Mapping[str, Any] | None = None,
        *,
        seq_len: int,
        domains: Sequence[str] | None = None,
        seed: int | None = None,
        apply: Literal["sample", "loss"] = "sample",
        eval_windows: int = 16,
        eval_batch_size: int | None = None,
        reference_model: nn.Module | None = None,
        check_ranks: bool = True,
        resume_from: str | Path | None = None,
        weighting: str | Path | None = None,
    ):
        self.data = data if isinstance(data, DataDir) else DataDir.open(data)
        self.domains = list(domains) if domains is not None else list(self.data.domains)
        for d in self.domains:
            self.data.manifest.domain(d)  # a clear DataError for an unknown domain
        self.m = len(self.domains)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len must be an integer >= 1, got {seq_len!r}.")
        if apply not in ("sample", "loss"):
            raise ConfigError(f"apply must be 'sample' or 'loss', got {apply!r}.")
        if eval_windows < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ConfigError("eval_windows and eval_batch_size must be >= 1.")
        if mixer in UNSUPPORTED_MIXERS:
            raise ConfigError(
                f"mixer '{mixer}' needs signals.{UNSUPPORTED_MIXERS[mixer]}, which the Hugging "
                "Face Trainer integration does not provide. Train it with `mixlab train` "
                "instead: model.kind = 'hf' trains any transformers causal LM."
            )
        self.mixer_name = mixer
        self.mixer_options = dict(mixer_options or {})
        # Validate the options now; the mixer itself needs the run's batch size and length.
        from_dict(mixer_class(mixer).Config, self.mixer_options, where=f"mixer.{mixer}")
        self.seq_len = seq_len
        self.seed = seed
        self.apply = apply
        self.eval_windows = eval_windows
        self.eval_batch_size = eval_batch_size
        self.reference_model = reference_model
        self.check_ranks = check_ranks
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.train_tokens = np.array(
            [self.data.split(d, "train").n_tokens for d in self.domains], dtype=np.int64
        )
        self.weighting = None if weighting is None else Path(weighting)
        if self.weighting is not None:  # fail now, not at on_train_begin, on a model that does not fit
            load_net(self.weighting, self.data.manifest.tokenizer_sha256, self.domains)
        self.weighter: DataWeighter | None = None
        self.train_dataset = MixtureSlots(seq_len)
        """Pass as the Trainer's ``train_dataset``."""

        self.mixer: Mixer | None = None
        self.sampler: MixtureSampler | None = None
        self.history: list[StepLog] = []
        self.nonfinite_steps = 0
        self._args: Any = None
        self._ranks = DistInfo()
        self._model: nn.Module | None = None
        self._hook: Any = None
        self._active: _ActiveStep | None = None
        self._eval_set: dict[str, torch.Tensor] = {}
        self._eval_cache: tuple[int, np.ndarray] | None = None
        self._checked_inputs = False
        self._global_batch = 0
        self._seed = 0
        self._micro = 0
        self._eval_bs = 1
        self._device = torch.device("cpu")

    # ------------------------------------------------------------------ setup

    def _check_args(self, args: TrainingArguments) -> None:
        """Refuse Trainer settings under which the batch of a step would not be the plan's."""
        if args.max_steps is None or args.max_steps <= 0:
            raise ConfigError(
                "set TrainingArguments.max_steps: mixlab's dataset is an endless stream, and "
                "mixers need the run's length."
            )
        if getattr(args, "n_gpu", 1) > 1:
            raise ConfigError(
                f"the Trainer sees {args.n_gpu} GPUs in one process (torch.nn.DataParallel), "
                "which splits each micro-batch behind mixlab's back; launch one process per GPU "
                "with torchrun or accelerate launch."
            )
        if getattr(args, "torch_compile", False):
            raise ConfigError(
                "torch_compile is not supported with MixlabCallback: the tokens enter through a "
                "forward pre-hook that a compiled graph may not re-run; set torch_compile=False."
            )
        if getattr(args, "auto_find_batch_size", False):
            raise ConfigError(
                "auto_find_batch_size changes the batch size during the run, and with it the "
                "mixture's batch composition; set it to False and choose the batch size."
            )
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ConfigError(
                "FSDP and DeepSpeed are not supported by MixlabCallback yet: the eval signals "
                "split windows unevenly over ranks, and a sharded model needs every rank in "
                "every forward. Use DDP (torchrun without fsdp/deepspeed), or `mixlab train`."
            )
        acc = getattr(args, "accelerator_config", None)
        if acc is not None and getattr(acc, "split_batches", False):
            raise ConfigError(
                "accelerator_config.split_batches is not supported: mixlab draws each rank's "
                "per_device_train_batch_size samples itself; set split_batches=False."
            )

    def _checkpoint_path(self, args: TrainingArguments, step: int) -> Path:
        if self.resume_from is not None:
            return self.resume_from
        prefix = _transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
        return Path(args.output_dir) / f"{prefix}-{step}"

    def _identity(self) -> dict[str, Any]:
        """What must match between a checkpoint and the run that resumes it."""
        return {
            "mixer": self.mixer_name,
            "mixer_options": to_plain(self.mixer_options),
            "apply": self.apply,
            "domains": list(self.domains),
            "seq_len": self.seq_len,
            "global_batch": self._global_batch,
            "seed": self._seed,
            "eval_windows": self.eval_windows,
        }

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._check_args(args)
        if _find_slots(kwargs.get("train_dataloader")) is not self.train_dataset:
            raise ConfigError(
                "the Trainer's train_dataset is not this callback's: pass "
                "Trainer(train_dataset=mixlab.train_dataset, compute_loss_func="
                "mixlab.compute_loss, callbacks=[mixlab])."
            )
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise MixlabError("the Trainer handed no model to MixlabCallback.on_train_begin.")
        self._args = args
        self._ranks = _ranks_from_args(args)
        self._seed = int(args.seed if self.seed is None else self.seed)
        ga = int(args.gradient_accumulation_steps)
        self._micro = int(args.per_device_train_batch_size)
        self._global_batch = self._micro * ga * self._ranks.world_size
        self.sampler = MixtureSampler(
            self.data, "train", self.seq_len, self._global_batch, self._seed,
            self._ranks.rank, self._ranks.world_size, self.domains,
        )
        ctx = MixerContext(
            domains=self.domains,
            train_tokens=self.train_tokens,
            total_steps=int(args.max_steps),
            batch_size=self._global_batch,
            seq_len=self.seq_len,
            seed=self._seed,
        )
        self.mixer = build_mixer(self.mixer_name, self.mixer_options, ctx)
        self._eval_set = EvalSet.from_data(
            self.data, self.domains, "val", self.eval_windows, self.seq_len,
            self._seed + SIGNAL_SEED_OFFSET,
        ).windows
        self._eval_bs = int(self.eval_batch_size or args.per_device_eval_batch_size)
        self._device = torch.device(args.device)
        if self.reference_model is not None:
            self.reference_model.to(self._device).eval()
        if self.weighting is not None:
            self.weighter = DataWeighter(
                WeightingConfig(name="dwm", load=str(self.weighting), frozen=True),
                vocab_size=self.data.vocab_size, domains=self.domains,
                tokenizer_sha256=self.data.manifest.tokenizer_sha256,
                total_steps=int(args.max_steps), device=self._device, seed=self._seed,
            )
        self._eval_cache = None
        self._active = None
        self._checked_inputs = False
        self.history = []
        self.nonfinite_steps = 0
        self._model = model
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._fill_inputs, with_kwargs=True)
        if state.global_step > 0:
            self._load(self._checkpoint_path(args, state.global_step), state.global_step)
        else:
            self.mixer.start(HFStepSignals(-1, self, None, None, None, float("nan")))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._active = None

    # ------------------------------------------------------------------ one step

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self.mixer is not None and self.sampler is not None
        step = int(state.global_step)
        if self.sampler.step != step:
            raise MixlabError(
                f"the Trainer is at step {step} but mixlab's data stream at step "
                f"{self.sampler.step}; was the checkpoint's mixlab_state.pt from another step?"
            )
        plan = resolve_plan(self.mixer.plan(step), self.m, self.apply, self.mixer_name)
        if self.check_ranks:
            check_same_on_all_ranks(plan.weights, "mixture weights", step, self._ranks)
        if plan.counts is not None:
            batch = self.sampler.next_batch(counts=np.asarray(plan.counts, dtype=np.int64))
        else:
            batch = self.sampler.next_batch(weights=plan.weights)
        ga = int(args.gradient_accumulation_steps)
        self._active = _ActiveStep(
            step=step, plan=plan, batch=batch, factors=loss_factors(plan),
            micro=self._micro, losses=[None] * ga,
            token_losses=[None] * ga if getattr(self.mixer, "wants_token_losses", False) else None,
        )

    def _fill_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: the next micro-batch of the step in place of the placeholders."""
        active = self._active
        ids = kwargs.get("input_ids")
        if active is None or not module.training or ids is None:
            return None  # evaluation, or a forward outside mixlab's training steps
        b = active.micro
        if tuple(ids.shape) != (b, self.seq_len):
            raise ConfigError(
                f"the Trainer fed a micro-batch of shape {tuple(ids.shape)}; mixlab expects "
                f"[per_device_train_batch_size, seq_len] = [{b}, {self.seq_len}]. Use "
                "train_dataset=mixlab.train_dataset and no collator that pads or truncates."
            )
        if not self._checked_inputs:
            # One value check per run (it synchronises with the device): real tokens here mean
            # another dataset is feeding the Trainer, and would be silently replaced.
            if not bool((ids == INPUT_PLACEHOLDER).all()):
                raise ConfigError(
                    "the Trainer's training batches are not mixlab's placeholders: pass "
                    "train_dataset=mixlab.train_dataset to the Trainer."
                )
            self._checked_inputs = True
        k = active.forwards
        if k >= len(active.losses):
            raise MixlabError(
                f"step {active.step} ran more than gradient_accumulation_steps = "
                f"{len(active.losses)} training forwards; another callback or hook runs the "
                "model in training mode, which mixlab cannot tell apart from a micro-batch."
            )
        if active.current is not None:
            raise MixlabError(
                f"micro-batch {active.current} of step {active.step} had no loss computed: "
                "pass compute_loss_func=mixlab.compute_loss to the Trainer."
            )
        tokens = active.batch.tokens[k * b : (k + 1) * b, :-1]
        kwargs = {**kwargs, "input_ids": tokens.to(ids.device, non_blocking=True)}
        active.forwards, active.current = k + 1, k
        return args, kwargs

    def compute_loss(
        self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """``compute_loss_func`` for the Trainer.

        In a training step: Σ_i f_i ℓ_i / (b * GA) over the micro-batch's samples, with ℓ_i the
        sample's mean next-token loss and f_i = w_d / q_d of its domain (1 when the plan does not
        re-weight the loss), so that the GA micro-batches of a rank add up to that rank's mean.
        Elsewhere (``Trainer.evaluate`` on your eval_dataset) it is the ordinary causal-LM loss
        of ``labels`` (shifted by one, -100 ignored), summed over ``num_items_in_batch`` tokens
        when the Trainer counts them.
        """
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        active = self._active
        if active is None:
            return _plain_causal_loss(logits, labels, num_items_in_batch)
        k = active.current
        if k is None:
            raise MixlabError(
                "mixlab's compute_loss ran on a training batch that its forward hook did not "
                "fill; pass train_dataset=mixlab.train_dataset and callbacks=[mixlab] to the "
                "same Trainer."
            )
        b = active.micro
        targets = active.batch.tokens[k * b : (k + 1) * b, 1:].to(logits.device, non_blocking=True)
        if active.token_losses is not None:
            tok = per_token_cross_entropy(logits, targets)
            losses = tok.mean(dim=1)  # the ops of per_sample_cross_entropy: the same values
            active.token_losses[k] = tok.detach()
        else:
            losses = per_sample_cross_entropy(logits, targets)
        factors = self._sample_factors(active, k, losses)
        weighted = losses if factors is None else losses * factors.to(losses.device)
        loss = weighted.sum() / (b * len(active.losses))
        if (
            self._ranks.world_size > 1
            and num_items_in_batch is not None
            and getattr(self._args, "average_tokens_across_devices", False)
        ):
            # Trainer.compute_loss multiplies a compute_loss_func's result by the number of
            # processes in this case (it expects a sum over the global token count); undo it.
            loss = loss / self._ranks.world_size
        active.losses[k] = losses.detach()
        active.current = None
        return loss

    def _sample_factors(self, active: _ActiveStep, k: int, losses: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss multipliers [b] of micro-batch ``k`` (``losses`` [b] its per-sample
        losses), or None for plain averaging: the mixer's w_d / q_d of each sample's domain
        times the frozen weighting model's weight of the sample.

        This is the one place a sample's weight in the loss is decided.
        """
        b = active.micro
        domains = active.batch.domains[k * b : (k + 1) * b]
        out = None if active.factors is None else torch.as_tensor(active.factors, dtype=torch.float32)[domains]
        if self.weighter is not None:
            tokens = active.batch.tokens[k * b : (k + 1) * b]
            w = self.weighter.weights(tokens, domains, losses.detach(), active.step).cpu()
            out = w if out is None else out * w
        return out

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        active = self._active
        if active is None:
            return
        missing = [k for k, loss in enumerate(active.losses) if loss is None]
        if missing:
            # Raised before the first optimizer step, so no update happens on placeholders.
            raise MixlabError(
                f"step {active.step}: micro-batches {missing} were trained without mixlab's "
                "loss; pass compute_loss_func=mixlab.compute_loss to the Trainer (the model's "
                "own loss would train on the placeholder labels)."
            )
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            active.lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        active = self._active
        if active is None:
            return
        assert self.mixer is not None
        self._active = None
        local = torch.cat([x for x in active.losses if x is not None]).float().cpu().numpy()
        losses = all_gather_array(local, self._ranks)
        domains = all_gather_array(active.batch.domains.numpy(), self._ranks).astype(np.int64)
        factors = np.ones(self.m) if active.factors is None else active.factors
        finite = bool(np.all(np.isfinite(losses)))
        if finite:
            token_losses = None
            if active.token_losses is not None and all(t is not None for t in active.token_losses):
                token_losses = torch.cat(active.token_losses).float().cpu()  # type: ignore[arg-type]
            signals = HFStepSignals(
                active.step, self, losses, domains, active.batch.tokens, active.lr, token_losses
            )
            self.mixer.observe(active.step, signals)
        else:
            self.nonfinite_steps += 1
        self.history.append(
            StepLog(
                step=active.step,
                phase=active.plan.phase,
                weights=np.asarray(active.plan.weights, dtype=np.float64),
                counts=None if active.plan.counts is None else np.asarray(active.plan.counts),
                drawn=active.batch.global_counts.copy(),
                loss_weights=None
                if active.plan.loss_weights is None
                else np.asarray(active.plan.loss_weights, dtype=np.float64),
                loss=float(np.mean(factors[domains] * losses)),
                domain_losses=per_domain_mean(losses, domains, self.m),
                observed=finite,
            )
        )

    # ------------------------------------------------------------------ signals

    @torch.no_grad()
    def _mean_losses(self, model: nn.Module, windows: Sequence[torch.Tensor]) -> np.ndarray:
        """[len(windows)] mean per-sample loss of ``model`` on each set of windows [n, T+1];
        each rank scores every world-th window and the sums are all-reduced."""
        r = self._ranks
        sums = np.zeros(len(windows))
        counts = np.zeros(len(windows))
        was_training = model.training
        model.eval()
        try:
            for i, w in enumerate(windows):
                mine = w[r.rank :: r.world_size]
                for start in range(0, mine.shape[0], self._eval_bs):
                    chunk = mine[start : start + self._eval_bs].to(self._device)
                    logits = _logits(model(input_ids=chunk[:, :-1], use_cache=False))
                    sums[i] += float(per_sample_cross_entropy(logits, chunk[:, 1:]).double().sum())
                counts[i] = mine.shape[0]
        finally:
            model.train(was_training)
        return all_reduce_sum(sums, r) / np.maximum(all_reduce_sum(counts, r), 1.0)

    def eval_losses(self, step: int) -> np.ndarray:
        """[m] loss of the current model on the eval-signal subset (cached for ``step``)."""
        if self._eval_cache is None or self._eval_cache[0] != step:
            assert self._model is not None
            values = self._mean_losses(self._model, [self._eval_set[d] for d in self.domains])
            self._eval_cache = (step, values)
        return self._eval_cache[1].copy()

    @torch.no_grad()
    def reference_sample_losses(self, tokens: torch.Tensor) -> np.ndarray:
        """Per-sample losses [B] of the reference model on this rank's ``tokens`` [n, T+1],
        gathered over ranks in rank order (the order of the step's other per-sample arrays)."""
        if self.reference_model is None:
            raise ConfigError(
                f"mixer '{self.mixer_name}' needs a reference model: pass "
                "MixlabCallback(..., reference_model=model) with a model trained on the "
                "reference mixture (e.g. stratified)."
            )
        return all_gather_array(self.reference_token_losses(tokens).mean(dim=1).numpy(), self._ranks)

    @torch.no_grad()
    def reference_token_losses(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token losses [n, T] (float32, CPU) of the reference model on this rank's
        ``tokens`` [n, T+1] (not gathered)."""
        if self.reference_model is None:
            raise ConfigError(
                f"mixer '{self.mixer_name}' needs a reference model: pass "
                "MixlabCallback(..., reference_model=model) with a model trained on the "
                "reference mixture (e.g. stratified)."
            )
        out = []
        for start in range(0, tokens.shape[0], self._eval_bs):
            chunk = tokens[start : start + self._eval_bs].to(self._device)
            logits = _logits(self.reference_model(input_ids=chunk[:, :-1], use_cache=False))
            out.append(per_token_cross_entropy(logits, chunk[:, 1:]).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The sampler, the mixer and the counters, as plain Python values (loads with
        ``torch.load(weights_only=True)``); the same on every rank."""
        if self.mixer is None or self.sampler is None:
            raise MixlabError("MixlabCallback has no state before trainer.train() starts.")
        return {
            "version": STATE_VERSION,
            "global_step": self.sampler.step,
            "identity": self._identity(),
            "sampler": self.sampler.state_dict(),
            "mixer": to_plain(self.mixer.state_dict()),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.mixer is None or not state.is_world_process_zero:
            return
        prefix = _transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
        folder = Path(args.output_dir) / f"{prefix}-{state.global_step}"
        if not folder.is_dir():
            raise CheckpointError(
                f"the Trainer reported a checkpoint at step {state.global_step} but '{folder}' "
                "does not exist (hyperparameter search runs are not supported)."
            )
        state_dict = self.state_dict()
        if state_dict["global_step"] != state.global_step:
            raise MixlabError(
                f"saving at Trainer step {state.global_step} but mixlab is at step "
                f"{state_dict['global_step']}."
            )
        tmp = folder / f".{STATE_FILE}.tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, folder / STATE_FILE)  # a reader never sees a half-written state

    def _load(self, folder: Path, global_step: int) -> None:
        assert self.mixer is not None and self.sampler is not None
        path = folder / STATE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"resuming at step {global_step}, but '{path}' does not exist. Resume from a "
                "checkpoint written with MixlabCallback; for a checkpoint outside output_dir, "
                "set MixlabCallback(..., resume_from=CHECKPOINT_FOLDER)."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise CheckpointError(f"cannot read '{path}': {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"'{path}' is not a mixlab state of version {STATE_VERSION}."
            )
        if state["global_step"] != global_step:
            raise CheckpointError(
                f"'{path}' holds mixlab's state at step {state['global_step']}, but the Trainer "
                f"resumes at step {global_step}; resume_from names another checkpoint."
            )
        mine = self._identity()
        diffs = [
            f"{k}: {state['identity'].get(k)!r} in the checkpoint, {v!r} here"
            for k, v in mine.items()
            if state["identity"].get(k) != v
        ]
        if diffs:
            raise CheckpointError(
                f"'{path}' was written by a different mixlab setup: " + "; ".join(diffs) + "."
            )
        self.sampler.load_state_dict(state["sampler"])
        self.mixer.load_state_dict(state["mixer"])
        self.nonfinite_steps = int(state["nonfinite_steps"])


def _logits(outputs: Any) -> torch.Tensor:
    """The logits of a model output (a ``ModelOutput``, a dict or a tuple)."""
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]


def _plain_causal_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, num_items_in_batch: Any
) -> torch.Tensor:
    """Mean next-token loss of ``labels`` [b, T] (-100 ignored) under ``logits`` [b, T, V];
    the sum over ``num_items_in_batch`` tokens when given (the Trainer's convention)."""
    if labels is None:
        raise ConfigError("compute_loss got no labels outside a mixlab training step.")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=-100, reduction="sum",
    )
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / shift_labels.ne(-100).sum().clamp(min=1)
