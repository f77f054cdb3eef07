"""A ``MixingSession`` seen as a PyTorch ``IterableDataset`` (for ``StatefulDataLoader``).

Iterating a ``MixingDataset`` yields one ``ActiveStep`` per optimizer step, from the session's
next step to the end of the run: the mixer's plan for that step and this rank's batch
(``st.tokens(k)``: micro-batch k, [micro, T+1] LongTensor on the CPU). The loop feeds the
per-sample losses back through the session as in ``examples/own_loop.py``::

    ds = MixingDataset(session, micro_batches=GA)
    loader = ds.loader()                              # StatefulDataLoader(ds, batch_size=None)
    for st in loader:
        for k in range(GA):
            x = st.tokens(k)                          # [micro, T+1]
            session.loss(st, k, per_sample_losses(x)).backward()
        session.before_optimizer_step(st); optimizer.step(); optimizer.zero_grad()
        session.end_step(st)                          # the mixer observes step st.step
        ... torch.save({"model": ..., "optimizer": ..., "loader": loader.state_dict()}, ...)

``loader.state_dict()`` carries the whole session state (samplers, mixer, weighting model), so
``loader.load_state_dict(saved)`` on a freshly built session and loader resumes the run exactly.

Why one process (``num_workers=0``) and no prefetching: the batch of step t+1 is drawn from the
plan the mixer makes *after* observing the losses of step t, which only the main process sees.
A worker process would hold a copy of the session that never observes anything, and a loader
that fetches ahead would draw step t+1 from a stale plan. ``__iter__`` refuses to run in a
worker, and refuses to draw step t+1 before the losses of every micro-batch of step t were
given to ``session.loss`` (which is how fetching ahead shows itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mixlab.errors import CheckpointError, ConfigError
from mixlab.train.checkpoint import to_plain
from mixlab.train.session import ActiveStep, MixingSession

STATE_VERSION = 1


def refuse_workers(what: str) -> None:
    """Raise when called inside a DataLoader worker process (``num_workers > 0``)."""
    if get_worker_info() is not None:
        raise ConfigError(
            f"{what} must be read with num_workers=0: the mixture of each step depends on the "
            "losses the main process observes, which a worker's copy of the session never sees."
        )


def check_identity(saved: dict[str, Any], mine: dict[str, Any], what: str) -> None:
    """Refuse to restore a session state whose setup (mixer, options, domains, seed, batch...)
    differs from this one's, naming every field that differs."""
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{what} was written by a different mixlab setup: " + "; ".join(diffs) + ".")


class MixingDataset(IterableDataset):
    """The session's training steps as a dataset: one ``ActiveStep`` per item (see the module
    docstring). Iterate it with ``batch_size=None`` (each item is already a whole step)."""

    def __init__(self, session: MixingSession, micro_batches: int | None = None):
        """``micro_batches``: forwards per optimizer step (default: the session's
        ``train.grad_accum``); the rank's slice must split into them evenly."""
        super().__init__()
        self.session = session
        self.micro_batches = micro_batches or session.cfg.train.grad_accum
        per_rank = session.cfg.train.batch_size // session.world
        if per_rank % self.micro_batches:
            raise ConfigError(
                f"this rank's {per_rank} samples per step do not split into {self.micro_batches} "
                "micro-batches; change micro_batches or train.batch_size."
            )
        self._last: ActiveStep | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps in the run (``train.steps``): the number of items a fresh run yields."""
        return self.session.cfg.train.steps

    def _check_fed(self) -> None:
        st = self._last
        if st is not None and len(st.losses) < self.micro_batches:
            raise ConfigError(
                f"step {st.step + 1} was asked for before the losses of step {st.step} were fed "
                f"back ({len(st.losses)} of {self.micro_batches} micro-batches through "
                "session.loss): read this dataset with num_workers=0 and no prefetching, and "
                "call session.loss / session.end_step before taking the next batch."
            )

    def __iter__(self) -> Iterator[ActiveStep]:
        refuse_workers("MixingDataset")
        # Lazily from the session's step: a generator's body runs at the first next(), after
        # StatefulDataLoader has loaded the saved state into the session.
        while self.session.step < self.steps:
            self._check_fed()
            self._last = self.session.begin_step(self.session.step, self.micro_batches)
            yield self._last

    def loader(self, **kwargs: Any) -> DataLoader:
        """A ``torchdata`` ``StatefulDataLoader`` over this dataset (``batch_size=None``,
        ``num_workers=0``), or a plain ``DataLoader`` when torchdata is not installed (then
        checkpoint ``dataset.state_dict()`` yourself). ``kwargs`` go to the loader."""
        if kwargs.get("num_workers", 0):
            raise ConfigError("MixingDataset.loader: num_workers must be 0, the mixture of each "
                              "step depends on the losses the main process observes.")
        kwargs = {"batch_size": None, "num_workers": 0, **kwargs}
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader
        except ImportError:
            return DataLoader(self, **kwargs)
        return StatefulDataLoader(self, **kwargs)

    # ------------------------------------------------------------------ state

    def _identity(self) -> dict[str, Any]:
        c = self.session.cfg
        return {"mixer": c.mixer.name, "domains": list(self.session.domains), "seed": c.train.seed,
                "batch_size": c.train.batch_size, "seq_len": c.data.seq_len, "steps": c.train.steps,
                "micro_batches": self.micro_batches, "world_size": self.session.world}

    def state_dict(self) -> dict[str, Any]:
        """The session's state between two steps, as plain values and tensors (loads with
        ``torch.load(weights_only=True)``). Refused while a step is in flight (drawn, its
        losses not all fed back): the mixer has not observed it yet."""
        st = self._last
        if st is not None and len(st.losses) < self.micro_batches:
            raise CheckpointError(
                f"step {st.step} is in flight: save the loader's state after session.end_step."
            )
        return {"version": STATE_VERSION, "identity": self._identity(),
                "session": to_plain(self.session.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"not a MixingDataset state of version {STATE_VERSION}.")
        check_identity(state["identity"], self._identity(), "the saved state")
        self.session.load_state_dict(state["session"])
        self._last = None
