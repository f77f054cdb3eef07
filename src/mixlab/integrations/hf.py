"""Every mixlab mixer, and DWM, inside the Hugging Face ``transformers.Trainer``.

Usage (the whole of it)::

    from mixlab.integrations.hf import MixlabCallback

    mixlab = MixlabCallback("data/builtin", mixer="dga", seq_len=128,
                            config={"target": {"domain": "medical", "docs": 20}})
    trainer = Trainer(
        model=model,                            # any transformers causal LM
        args=TrainingArguments(..., max_steps=1000),
        train_dataset=mixlab.train_dataset,
        compute_loss_func=mixlab.compute_loss,
        callbacks=[mixlab],
    )
    mixlab.attach(trainer)                      # optional: mixlab's values reach report_to
    trainer.train()                             # or trainer.train(resume_from_checkpoint=True)

The callback is a driver of ``mixlab.train.session.MixingSession``, the same session
``mixlab train`` drives: the plan, the batch, the loss factors, the signals (eval losses,
target loss, reference and excess losses, per-sample alignments, per-domain gradients, branch
copies of the model and optimizer), the repetition budget and the weighting model are that
session's, so a mixer does the same thing here as there. What is left in this module is what
is specific to the Trainer.

With ``b = per_device_train_batch_size``, ``GA = gradient_accumulation_steps`` and ``W`` processes,
one optimizer step trains on a global batch of ``B = b * GA * W`` windows of ``seq_len + 1``
tokens, exactly as ``mixlab train`` does::

    on_step_begin(t)   session.begin_step(t, GA): plan, this rank's slice [b * GA, seq_len + 1]
    forward k < GA     a forward pre-hook on the model puts micro-batch k of that slice
                       (tokens[:, :-1]) in place of the placeholder ``input_ids``
    compute_loss       per-sample next-token cross-entropy [b] from the logits and the targets
                       tokens[:, 1:]; session.loss: Σ f_i w_i ℓ_i / (b * GA) (DDP averages ranks)
    pre-optimizer      session.before_optimizer_step (DWM's bi-level update)
    on_step_end(t)     unless a loss was NaN/inf on some rank, session.end_step: losses and
                       domains gathered in rank order, mixer.observe(t, signals)
    on_log             mixture weights, per-domain train losses and the mixer's report values
                       added to the Trainer's logs (``mixlab/...``), so ``report_to`` sends them
    on_save            mixlab_state.pt (the session's state) written atomically into the
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
session's state in ``mixlab_state.pt``).

Differences from ``mixlab train`` that come from the Trainer: the learning rate, optimizer and
clipping are the Trainer's (branch copies copy its optimizer, class, groups and state); the
Trainer applies the update of a step whose loss is NaN/inf (the mixer still never observes it,
and ``nonfinite_steps`` counts it); the Trainer clips gradients *before* its pre-optimizer
event, so DWM's lookahead steps along the clipped gradient when ``max_grad_norm > 0``
(``mixlab train`` uses the unclipped one; with ``max_grad_norm = 0`` the two are the same).
FSDP and DeepSpeed are refused (see ``_check_args``).
"""

from __future__ import annotations

import contextlib
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

from mixlab.config import from_dict, to_dict
from mixlab.data.format import DataDir
from mixlab.data.sampler import MixtureSampler
from mixlab.errors import CheckpointError, ConfigError, MixlabError
from mixlab.mixers.base import Mixer, mixer_class
from mixlab.model import sequence_losses
from mixlab.model import token_losses as per_token_cross_entropy
from mixlab.model.hf import HFCausalLM, require_transformers
from mixlab.train.checkpoint import to_plain
from mixlab.train.config import TrainConfig
from mixlab.train.distributed import DistInfo, any_rank
from mixlab.train.session import ActiveStep, MixingSession, RunView, config_for, merge_config
from mixlab.train.signals import per_domain_mean

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

_transformers = require_transformers()
TrainerCallback = _transformers.TrainerCallback

STATE_FILE = "mixlab_state.pt"
"""Name of the file ``on_save`` writes into each Trainer checkpoint folder."""
STATE_VERSION = 2
"""Version of the dict in ``STATE_FILE`` (2: the mixing session's state)."""
INPUT_PLACEHOLDER = -1
"""Value of every placeholder ``input_ids`` entry: not a token id, so a model fed a placeholder
fails loudly instead of training on it."""
LABEL_PLACEHOLDER = -100
"""Value of every placeholder ``labels`` entry: the ignore index of every HF loss."""
LOG_PREFIX = "mixlab/"
"""Prefix of the keys ``on_log`` adds to the Trainer's logs."""

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
# Per-step bookkeeping.


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
class _HFStep:
    """The optimizer step in progress on this rank: the session's step and the Trainer's
    micro-batch bookkeeping."""

    st: ActiveStep
    computed: list[bool]
    """Whether micro-batch k's loss went through ``compute_loss``."""
    forwards: int = 0
    current: int | None = None
    """Index of the micro-batch whose forward ran and whose loss is not computed yet."""


# ---------------------------------------------------------------------------------------------
# The callback.


class MixlabCallback(TrainerCallback):
    """A mixlab mixer driving the data of a ``transformers.Trainer`` run.

    Pass ``train_dataset=cb.train_dataset``, ``compute_loss_func=cb.compute_loss`` and
    ``callbacks=[cb]`` to the Trainer (see the module docstring). The session is built at
    ``on_train_begin``, when the batch size, world size and ``max_steps`` are known;
    afterwards ``cb.session``, ``cb.mixer``, ``cb.sampler`` and ``cb.history`` (one ``StepLog``
    per step trained in this process) can be read.

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
        eval_windows: windows per domain of the validation subset behind ``eval_losses``
            (``eval.signal_windows``).
        eval_batch_size: samples per forward of the signal passes (default
            ``per_device_eval_batch_size``).
        reference_model: a trained model for ``reference_losses``/``excess_losses`` (DoReMi);
            moved to the training device and kept in eval mode.
        check_ranks: all-reduce a checksum of the mixture at every step and stop if ranks differ.
        resume_from: the checkpoint folder to read ``mixlab_state.pt`` from on resume, when it is
            not ``<output_dir>/checkpoint-<global_step>`` (a checkpoint of another output dir).
        weighting: a trained data weighting model (a ``mixlab train`` run dir with
            ``weighting.name = "dwm"``, or its ``dwm.safetensors``), used frozen; or a mapping of
            ``[weighting]`` settings (``{"name": "dwm"}`` trains one bi-level during the run and
            writes ``dwm.safetensors``/``dwm.json`` into ``output_dir`` at the end; its options
            under ``"options"``, e.g. ``{"name": "dwm", "options": {"stages": 2}}``).
        config: any other sections of a ``mixlab train`` config, as a mapping (``target``,
            ``data.max_epochs``, ``eval``, ``weighting``...). The Trainer's settings
            (steps, batch, accumulation, seed, ``max_grad_norm``) and the arguments above win.
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
        weighting: str | Path | Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
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
        extra = dict(config or {})
        if isinstance(weighting, Mapping):
            extra = merge_config(extra, {"weighting": dict(weighting)})
        elif weighting is not None:
            extra = merge_config(extra, {"weighting": {"name": "dwm", "options": {"load": str(weighting), "frozen": True}}})
        self.extra_config = extra
        # Fail now, not at on_train_begin, on a config that cannot hold (a trained weighting
        # model with another tokenizer, an unknown key): the Trainer's values are stand-ins.
        weighting_cfg = self._config(steps=1, batch=1, ga=1, seed=0, grad_clip=0.0, eval_bs=1).weighting
        if weighting_cfg.name == "dwm" and weighting_cfg.options.get("load"):
            from mixlab.weighting.dwm import load_net

            load_net(Path(weighting_cfg.options["load"]), self.data.manifest.tokenizer_sha256, self.domains)
        self.train_dataset = MixtureSlots(seq_len)
        """Pass as the Trainer's ``train_dataset``."""

        self.session: MixingSession | None = None
        self.history: list[StepLog] = []
        self.nonfinite_steps = 0
        self._args: Any = None
        self._ranks = DistInfo()
        self._hook: Any = None
        self._active: _HFStep | None = None
        self._measuring = False
        self._checked_inputs = False
        self._logged_upto = 0

    @property
    def mixer(self) -> Mixer | None:
        return None if self.session is None else self.session.mixer

    @property
    def sampler(self) -> MixtureSampler | None:
        return None if self.session is None else self.session.sampler

    # ------------------------------------------------------------------ setup

    def _config(self, *, steps: int, batch: int, ga: int, seed: int, grad_clip: float,
                eval_bs: int) -> TrainConfig:
        """The ``mixlab train`` config this run corresponds to."""
        extra = merge_config(self.extra_config, {
            "train": {"check_ranks": self.check_ranks},
            "optim": {"grad_clip": float(grad_clip)},
            "eval": {"signal_windows": self.eval_windows, "batch_size": eval_bs},
        })
        return config_for(self.data.root, steps=steps, batch_size=batch, seq_len=self.seq_len,
                          seed=seed, mixer=self.mixer_name, mixer_options=self.mixer_options,
                          apply=self.apply, grad_accum=ga, domains=self.domains, extra=extra,
                          where="MixlabCallback")

    def attach(self, trainer: Any) -> MixlabCallback:
        """Check that ``trainer`` uses this callback's dataset and loss, and put the callback
        first among its callbacks, so that the values ``on_log`` adds reach the reporting
        callbacks of ``report_to`` (W&B, MLflow, TensorBoard, Comet), which run after it."""
        if trainer.compute_loss_func != self.compute_loss:
            raise ConfigError("the Trainer's compute_loss_func is not this callback's: pass "
                              "compute_loss_func=mixlab.compute_loss.")
        handler = trainer.callback_handler
        handler.callbacks = [self] + [c for c in handler.callbacks if c is not self]
        return self

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
        """What must match between a checkpoint and the run that resumes it: the config."""
        assert self.session is not None
        cfg = to_plain(to_dict(self.session.cfg))
        cfg["train"].pop("device", None)
        return cfg

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
        ga = int(args.gradient_accumulation_steps)
        micro = int(args.per_device_train_batch_size)
        cfg = self._config(
            steps=int(args.max_steps), batch=micro * ga * self._ranks.world_size, ga=ga,
            seed=int(args.seed if self.seed is None else self.seed),
            grad_clip=float(args.max_grad_norm or 0.0),
            eval_bs=int(self.eval_batch_size or args.per_device_eval_batch_size),
        )
        device = torch.device(args.device)
        bf16 = bool(getattr(args, "bf16", False))
        optimizer = kwargs.get("optimizer")
        view = RunView(
            model=HFCausalLM.view(model), device=device, dist=self._ranks,
            autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext,
            optimizer=getattr(optimizer, "optimizer", optimizer),
        )
        reference = None if self.reference_model is None else HFCausalLM.view(self.reference_model)
        self.session = MixingSession(cfg, view, self.data, reference=reference)
        self._active = None
        self._checked_inputs = False
        self.history = []
        self.nonfinite_steps = 0
        self._logged_upto = 0
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._fill_inputs, with_kwargs=True)
        if state.global_step > 0:
            self._load(self._checkpoint_path(args, state.global_step), state.global_step)
        else:
            self.session.start()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._active = None
        if self.session is not None and state.is_world_process_zero:
            self.session.save_weighting(Path(args.output_dir))

    # ------------------------------------------------------------------ one step

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self.session is not None
        step = int(state.global_step)
        if self.session.sampler.step != step:
            raise MixlabError(
                f"the Trainer is at step {step} but mixlab's data stream at step "
                f"{self.session.sampler.step}; was the checkpoint's mixlab_state.pt from another step?"
            )
        ga = int(args.gradient_accumulation_steps)
        self._active = _HFStep(self.session.begin_step(step, ga), [False] * ga)

    def _fill_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: the next micro-batch of the step in place of the placeholders."""
        active = self._active
        ids = kwargs.get("input_ids")
        if active is None or self._measuring or not module.training or ids is None:
            return None  # evaluation, a signal's pass, or a forward outside mixlab's steps
        st = active.st
        b = st.micro
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
        if k >= len(active.computed):
            raise MixlabError(
                f"step {st.step} ran more than gradient_accumulation_steps = "
                f"{len(active.computed)} training forwards; another callback or hook runs the "
                "model in training mode, which mixlab cannot tell apart from a micro-batch."
            )
        if active.current is not None:
            raise MixlabError(
                f"micro-batch {active.current} of step {st.step} had no loss computed: "
                "pass compute_loss_func=mixlab.compute_loss to the Trainer."
            )
        kwargs = {**kwargs, "input_ids": st.tokens(k)[:, :-1].to(ids.device, non_blocking=True)}
        active.forwards, active.current = k + 1, k
        return args, kwargs

    def compute_loss(
        self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """``compute_loss_func`` for the Trainer.

        In a training step: ``MixingSession.loss``, Σ_i f_i w_i ℓ_i / (b * GA) over the
        micro-batch's samples, with ℓ_i the sample's mean next-token loss, f_i = w_d / q_d of its
        domain (1 when the plan does not re-weight the loss) and w_i the weighting model's
        weight (1 without one), so that the GA micro-batches of a rank add up to that rank's
        mean. Elsewhere (``Trainer.evaluate`` on your eval_dataset) it is the ordinary causal-LM
        loss of ``labels`` (shifted by one, -100 ignored), summed over ``num_items_in_batch``
        tokens when the Trainer counts them.
        """
        logits = _logits(outputs)
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
        assert self.session is not None
        targets = active.st.tokens(k)[:, 1:].to(logits.device, non_blocking=True)
        tok = None
        if self.session.wants_token_losses:
            tok = per_token_cross_entropy(logits, targets)
            losses = tok.mean(dim=1)  # the ops of per_sample_cross_entropy: the same values
        else:
            losses = per_sample_cross_entropy(logits, targets)
        loss = self.session.loss(active.st, k, losses, tok)
        if (
            self._ranks.world_size > 1
            and num_items_in_batch is not None
            and getattr(self._args, "average_tokens_across_devices", False)
        ):
            # Trainer.compute_loss multiplies a compute_loss_func's result by the number of
            # processes in this case (it expects a sum over the global token count); undo it.
            loss = loss / self._ranks.world_size
        active.computed[k] = True
        active.current = None
        return loss

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        active = self._active
        if active is None:
            return
        missing = [k for k, done in enumerate(active.computed) if not done]
        if missing:
            # Raised before the first optimizer step, so no update happens on placeholders.
            raise MixlabError(
                f"step {active.st.step}: micro-batches {missing} were trained without mixlab's "
                "loss; pass compute_loss_func=mixlab.compute_loss to the Trainer (the model's "
                "own loss would train on the placeholder labels)."
            )
        assert self.session is not None
        self._measuring = True  # the weighting model's passes are not micro-batches
        try:
            self.session.before_optimizer_step(active.st)
        finally:
            self._measuring = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        active = self._active
        if active is None:
            return
        assert self.session is not None
        self._active = None
        st = active.st
        local = torch.cat(st.losses)
        # Every rank must take the same branch: end_step is a collective.
        finite = not any_rank(not bool(torch.isfinite(local).all()), self._ranks)
        plan = st.plan
        if finite:
            result = self.session.end_step(st)
            losses, domains, loss = result.sample_losses, result.domains, result.loss
        else:
            self.nonfinite_steps += 1
            losses = np.full(st.batch.global_counts.sum(), np.nan)
            domains = np.repeat(np.arange(self.m), st.batch.global_counts)
            loss = float("nan")
        self.history.append(
            StepLog(
                step=st.step,
                phase=plan.phase,
                weights=np.asarray(plan.weights, dtype=np.float64),
                counts=None if plan.counts is None else np.asarray(plan.counts),
                drawn=st.batch.global_counts.copy(),
                loss_weights=None if plan.loss_weights is None
                else np.asarray(plan.loss_weights, dtype=np.float64),
                loss=loss,
                domain_losses=per_domain_mean(losses, domains, self.m),
                observed=finite,
            )
        )

    # ------------------------------------------------------------------ trackers

    def log_values(self) -> dict[str, float]:
        """Scalars for the Trainer's logs: the latest mixture (``mixlab/weight/<domain>``),
        the mean per-domain train loss since the last log (``mixlab/train_loss/<domain>``) and
        the mixer's and weighting model's numeric report values (``mixlab/mixer/<key>``,
        ``mixlab/weighting/<key>``; a per-domain list as ``.../<key>/<domain>``)."""
        out: dict[str, float] = {}
        if not self.history or self.session is None:
            return out
        last = self.history[-1]
        for d, w in zip(self.domains, last.weights):
            out[f"{LOG_PREFIX}weight/{d}"] = float(w)
        window = [h.domain_losses for h in self.history[self._logged_upto:] if h.observed]
        if window:
            dl = np.stack(window)
            seen = np.isfinite(dl)
            sums, counts = np.where(seen, dl, 0.0).sum(axis=0), seen.sum(axis=0)
            for i, d in enumerate(self.domains):
                if counts[i]:
                    out[f"{LOG_PREFIX}train_loss/{d}"] = float(sums[i] / counts[i])
        for section, values in self.session.report(last.step + 1).items():
            out.update(_flatten(f"{LOG_PREFIX}{section}", values, self.domains))
        return out

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if logs is None or self.session is None or "loss" not in logs:
            return  # only the training logs (not eval or the final summary)
        logs.update(self.log_values())
        self._logged_upto = len(self.history)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The session's state and the counters, as plain Python values and tensors (loads
        with ``torch.load(weights_only=True)``); the same on every rank."""
        if self.session is None:
            raise MixlabError("MixlabCallback has no state before trainer.train() starts.")
        return {
            "version": STATE_VERSION,
            "global_step": self.session.sampler.step,
            "identity": self._identity(),
            "session": to_plain(self.session.state_dict()),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.session is None:
            return
        state_dict = self.state_dict()  # on every rank: the weighting state is identical there
        if not state.is_world_process_zero:
            return
        prefix = _transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
        folder = Path(args.output_dir) / f"{prefix}-{state.global_step}"
        if not folder.is_dir():
            raise CheckpointError(
                f"the Trainer reported a checkpoint at step {state.global_step} but '{folder}' "
                "does not exist (hyperparameter search runs are not supported)."
            )
        if state_dict["global_step"] != state.global_step:
            raise MixlabError(
                f"saving at Trainer step {state.global_step} but mixlab is at step "
                f"{state_dict['global_step']}."
            )
        tmp = folder / f".{STATE_FILE}.tmp"
        torch.save(state_dict, tmp)
        os.replace(tmp, folder / STATE_FILE)  # a reader never sees a half-written state

    def _load(self, folder: Path, global_step: int) -> None:
        assert self.session is not None
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
        diffs = _diff(state["identity"], self._identity())
        if diffs:
            raise CheckpointError(
                f"'{path}' was written by a different mixlab setup: " + "; ".join(diffs) + "."
            )
        self.session.load_state_dict(state["session"])
        self.nonfinite_steps = int(state["nonfinite_steps"])


def _diff(saved: Mapping[str, Any], mine: Mapping[str, Any], where: str = "") -> list[str]:
    """'key: saved in the checkpoint, mine here' for every leaf that differs."""
    out = []
    for k in sorted(set(saved) | set(mine)):
        a, b = saved.get(k), mine.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}: {a!r} in the checkpoint, {b!r} here")
    return out


def _flatten(prefix: str, values: Any, domains: list[str]) -> dict[str, float]:
    """Numeric leaves of a report dict as ``prefix/key`` scalars; a list of one number per
    domain becomes ``prefix/key/<domain>``; other values are left out."""
    out: dict[str, float] = {}
    if isinstance(values, Mapping):
        for k, v in values.items():
            out.update(_flatten(f"{prefix}/{k}", v, domains))
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        if np.isfinite(values):
            out[prefix] = float(values)
    elif isinstance(values, (list, tuple)) and len(values) == len(domains) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        for d, v in zip(domains, values):
            if np.isfinite(v):
                out[f"{prefix}/{d}"] = float(v)
    return out


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
