"""Any mixlab mixer in a PyTorch Lightning run: a ``Callback`` that drives a ``MixingSession``
from the user's ``LightningModule`` (``pip install 'mixlab[lightning]'``; see docs/lightning.md).

    mixlab = MixlabCallback("data/builtin", mixer="aioli", batch_size=32, seq_len=256)

    class LM(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x = batch["tokens"]                            # [micro, T+1], filled by the callback
            losses = per_sample_loss(self.model, x)        # [micro] per-sample losses, with graph
            return mixlab.loss(losses)                     # the session's weighted scalar

    trainer = L.Trainer(max_steps=1000, accumulate_grad_batches=4, callbacks=[mixlab])
    trainer.fit(LM(), datamodule=MixlabDataModule(mixlab))   # later: ckpt_path="last.ckpt"

One Lightning batch is one micro-batch; ``accumulate_grad_batches`` of them make an optimizer
step, i.e. one mixing step of ``batch_size`` samples. Per step t:

1. ``on_train_batch_start`` (micro-batch 0): the plan for t and this rank's batch
   (``session.begin_step``); on every micro-batch k the placeholder ``batch["tokens"]`` is
   replaced, in the dict Lightning hands to ``training_step``, by micro-batch k's tokens.
2. ``training_step`` returns ``mixlab.loss(per_sample_losses)``: Σ f_i w_i ℓ_i / b as the
   session computes it, times ``accumulate_grad_batches`` because Lightning divides what
   ``training_step`` returns by it (exact when it is a power of two, see docs/lightning.md).
3. ``on_before_optimizer_step`` (before Lightning's clipping): ``session.before_optimizer_step``.
4. ``on_train_batch_end`` (last micro-batch, after the optimizer step): ``session.end_step``,
   the mixer observes step t.

Why placeholders: Lightning fetches one batch ahead of the one it trains, so a dataset that drew
real tokens would draw step t+1 from the plan made before step t was observed. The tokens are
drawn in step 1 instead, after ``end_step(t - 1)``. The session's state (samplers, mixer,
weighting model) is this callback's ``state_dict``, saved in every Lightning checkpoint, so
``trainer.fit(..., ckpt_path=...)`` resumes the mixture and the data exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from mixlab.data.format import DataDir
from mixlab.errors import CheckpointError, ConfigError, MixlabError
from mixlab.integrations.torch_data import check_identity, refuse_workers
from mixlab.train.checkpoint import to_plain
from mixlab.train.session import ActiveStep, MixingSession

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "mixlab.integrations.lightning needs `pip install 'mixlab[lightning]'`."
    ) from exc

STATE_VERSION = 1
PLACEHOLDER = -1
"""The token id of a placeholder micro-batch: nothing a model can train on by accident."""


class MixingSlots(IterableDataset):
    """Placeholder micro-batches, one per Lightning batch, from the session's next step on.

    Each item is ``{"step": LongTensor [], "micro": LongTensor [], "tokens": LongTensor
    [micro, T+1] of -1}``; ``MixlabCallback`` puts the real tokens in place of ``tokens`` at
    ``on_train_batch_start``. Read it with ``batch_size=None`` and ``num_workers=0``."""

    def __init__(self, callback: MixlabCallback):
        super().__init__()
        self.callback = callback

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        refuse_workers("MixingSlots")
        cb = self.callback
        if cb.session is None:
            raise MixlabError("MixingSlots is read by trainer.fit with MixlabCallback in its "
                              "callbacks.")
        # Read at the first next(), after Lightning has restored the callback's state.
        start, steps, ga = cb.session.step, cb.session.cfg.train.steps, cb.micro_batches
        shape = (cb.session.cfg.train.batch_size // cb.session.world // ga, cb.seq_len + 1)
        for t in range(start, steps):
            for k in range(ga):
                yield {"step": torch.tensor(t), "micro": torch.tensor(k),
                       "tokens": torch.full(shape, PLACEHOLDER, dtype=torch.long)}


class MixlabDataModule(pl.LightningDataModule):
    """The training data of a ``MixlabCallback``: a ``DataLoader`` over its ``MixingSlots``."""

    def __init__(self, callback: MixlabCallback):
        super().__init__()
        self.callback = callback

    def train_dataloader(self) -> DataLoader:
        return DataLoader(MixingSlots(self.callback), batch_size=None, num_workers=0)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step trained in this process (``MixlabCallback.history``)."""

    step: int
    weights: np.ndarray
    """[m] the mixture of the step's plan."""
    loss: float
    """Mean (weighted) training loss over the global batch."""


class MixlabCallback(pl.Callback):
    """Drives a ``MixingSession`` from a ``LightningModule`` (see the module docstring)."""

    def __init__(
        self,
        data: str | Path | DataDir,
        mixer: str = "stratified",
        mixer_options: Mapping[str, Any] | None = None,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        domains: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        lr_at: Callable[[int], float] | None = None,
        model: Callable[[pl.LightningModule], nn.Module] | None = None,
        reference: nn.Module | None = None,
    ):
        """``batch_size``: samples per optimizer step (global: all ranks, all micro-batches);
        the number of steps and of micro-batches are the Trainer's ``max_steps`` and
        ``accumulate_grad_batches``. ``config``: other sections of a ``mixlab train`` config
        (``target``, ``eval``, ``weighting``...). ``lr_at(t)``: the learning rate of step t for
        the signals that read it (default: the optimizer's current one). ``model``: picks the
        network the signals evaluate, ``forward(idx [b, T]) -> logits [b, T, V]`` (default:
        the LightningModule itself)."""
        super().__init__()
        self.data = data
        self.mixer_name = mixer
        self.mixer_options = dict(mixer_options or {})
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.domains = domains
        self.config = dict(config or {})
        self.lr_at = lr_at
        self.pick_model = model or (lambda m: m)
        self.reference = reference
        self.session: MixingSession | None = None
        self.micro_batches = 1
        self.history: list[StepRecord] = []
        self._pending: dict[str, Any] | None = None
        self._st: ActiveStep | None = None
        self._k = -1

    # ------------------------------------------------------------------ set-up

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the session once the optimizer exists; load a restored state."""
        if trainer.max_steps is None or trainer.max_steps <= 0:
            raise ConfigError("MixlabCallback needs Trainer(max_steps=N): the run's length is "
                              "the mixer's horizon.")
        if len(trainer.optimizers) != 1:
            raise ConfigError("MixlabCallback supports exactly one optimizer.")
        self.micro_batches = trainer.accumulate_grad_batches
        self.session = MixingSession.for_loop(
            self.pick_model(pl_module), trainer.optimizers[0], data=self.data,
            steps=trainer.max_steps, batch_size=self.batch_size, seq_len=self.seq_len,
            mixer=self.mixer_name, mixer_options=self.mixer_options, seed=self.seed,
            micro_batches=self.micro_batches, domains=self.domains, config=self.config,
            device=pl_module.device, lr_at=self.lr_at, reference=self.reference,
        )
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.session is not None
        if self.session.step != trainer.global_step:
            raise CheckpointError(
                f"Lightning resumes at step {trainer.global_step} but mixlab's state is at step "
                f"{self.session.step}: resume from a checkpoint written with this callback."
            )

    # ------------------------------------------------------------------ the step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        session = self.session
        if session is None or not isinstance(batch, dict) or "micro" not in batch:
            raise MixlabError("train on MixlabDataModule(callback) (or its MixingSlots): the "
                              "callback fills its placeholder batches.")
        t, k = int(batch["step"]), int(batch["micro"])
        if k == 0:
            if t != session.step:
                raise MixlabError(f"placeholder of step {t} while mixlab is at step "
                                  f"{session.step}.")
            self._st = session.begin_step(t, self.micro_batches)
        elif self._st is None or self._st.step != t or k != self._k + 1:
            raise MixlabError(f"micro-batch {k} of step {t} out of order.")
        self._k = k
        batch["tokens"] = self._st.tokens(k).to(pl_module.device)

    def loss(self, losses: torch.Tensor, token_losses: torch.Tensor | None = None) -> torch.Tensor:
        """What ``training_step`` returns: ``losses`` [micro] the per-sample losses of
        ``batch["tokens"]`` (with the graph); ``token_losses`` [micro, T] when the mixer reads
        them (``session.wants_token_losses``, DoReMi)."""
        st = self._st
        if st is None or len(st.losses) != self._k:
            raise MixlabError("mixlab.loss is called once per training_step, on its batch.")
        loss = self.session.loss(st, self._k, losses, token_losses)  # type: ignore[union-attr]
        # Lightning divides the returned loss by accumulate_grad_batches; the session's is
        # already a share of the step's mean.
        return loss * self.micro_batches if self.micro_batches > 1 else loss

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        st = self._check_fed()
        self.session.before_optimizer_step(st)  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._k != self.micro_batches - 1:
            return
        st = self._check_fed()
        result = self.session.end_step(st)  # type: ignore[union-attr]
        self._st = None
        self.history.append(StepRecord(st.step, np.asarray(st.plan.weights), result.loss))
        for d, w in zip(self.session.domains, st.plan.weights):  # type: ignore[union-attr]
            pl_module.log(f"mixlab/weight/{d}", float(w), on_step=True, on_epoch=False)

    def _check_fed(self) -> ActiveStep:
        st = self._st
        if st is None or len(st.losses) != self._k + 1:
            raise MixlabError("training_step must return mixlab.loss(per_sample_losses) for "
                              "every micro-batch.")
        return st

    # ------------------------------------------------------------------ checkpoints

    def _identity(self) -> dict[str, Any]:
        s = self.session
        assert s is not None
        c = s.cfg
        return {"mixer": c.mixer.name, "mixer_options": to_plain(dict(c.mixer.options)),
                "domains": list(s.domains), "seed": c.train.seed, "batch_size": c.train.batch_size,
                "seq_len": c.data.seq_len, "steps": c.train.steps,
                "micro_batches": self.micro_batches, "world_size": s.world}

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the session's state, plain values and tensors."""
        if self.session is None:
            return {} if self._pending is None else self._pending
        if self._st is not None:
            raise CheckpointError(f"step {self._st.step} is in flight: checkpoint between steps "
                                  "(every_n_train_steps / on_train_batch_end).")
        return {"version": STATE_VERSION, "identity": self._identity(),
                "session": to_plain(self.session.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.session is None:  # restored before on_fit_start builds the session
            self._pending = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.session is not None
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"not a MixlabCallback state of version {STATE_VERSION}.")
        check_identity(state["identity"], self._identity(), "the checkpoint")
        self.session.load_state_dict(state["session"])
