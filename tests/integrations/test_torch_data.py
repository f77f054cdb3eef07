"""``MixingDataset`` read by torchdata's ``StatefulDataLoader``: a loop that saves the loader's
state after N steps, is rebuilt from scratch and restored, trains the same next batches as an
uninterrupted run (torchtitan's test_dataset_checkpointing pattern), with a dynamic mixer whose
plan moves because the losses go back through the session.

Every comparison is exact: on one CPU process the loop below performs the same float
operations in the same order as ``mixlab train`` (same model, optimizer, schedule, clipping,
micro-batches), and a resume restores every piece of state those operations read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.integrations.mixing_runs import (
    GA,
    STEPS,
    for_loop,
    full_config,
    model_and_optimizer,
    train_trajectory,
)

from mixlab.errors import CheckpointError, ConfigError
from mixlab.integrations.torch_data import MixingDataset
from mixlab.model import per_sample_loss

pytest.importorskip("torchdata")
from torchdata.stateful_dataloader import StatefulDataLoader


def run(data: Path, case: str, ckpt: Path, stop_after: int | None = None):
    """Train with a StatefulDataLoader over the session; with ``stop_after``, save model,
    optimizer and loader state after that many steps and stop; with ``ckpt`` present, resume.
    Returns ([n, m] the plans trained, [n, B, T+1] the tokens trained)."""
    cfg = full_config(data, case)
    model, opt = model_and_optimizer(cfg)
    session = for_loop(cfg, case, model, opt)
    loader = MixingDataset(session, GA).loader()
    assert isinstance(loader, StatefulDataLoader)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        loader.load_state_dict(state["loader"])
    weights, tokens = [], []
    for st in loader:
        for group in opt.param_groups:
            group["lr"] = st.lr
        opt.zero_grad(set_to_none=True)
        for k in range(GA):
            session.loss(st, k, per_sample_loss(model, st.tokens(k))).backward()
        session.before_optimizer_step(st)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        session.end_step(st)
        weights.append(np.asarray(st.plan.weights)), tokens.append(st.batch.tokens.clone())
        if stop_after is not None and st.step + 1 == stop_after:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "loader": loader.state_dict()}, ckpt)
            break
    return np.array(weights), torch.stack(tokens)


@pytest.mark.parametrize("case", ["dga", "aioli"])
def test_loader_state_resumes_the_next_batches_exactly(tiny_data, tmp_path, case):
    full_w, full_t = run(tiny_data, case, tmp_path / "none.pt")
    assert full_w.shape == (STEPS, 3)
    assert np.ptp(full_w, axis=0).max() > 1e-2  # the mixer moved: the losses were fed back
    # ... and the same trajectory as `mixlab train` (the same operations, see the docstring).
    np.testing.assert_array_equal(full_w, train_trajectory(full_config(tiny_data, case),
                                                           tmp_path / "train"))

    ckpt = tmp_path / "ckpt.pt"
    first_w, first_t = run(tiny_data, case, ckpt, stop_after=4)
    rest_w, rest_t = run(tiny_data, case, ckpt)  # everything rebuilt, then restored
    assert len(rest_w) == STEPS - 4
    np.testing.assert_array_equal(np.concatenate([first_w, rest_w]), full_w)
    assert torch.equal(torch.cat([first_t, rest_t]), full_t)


def test_the_loader_refuses_workers_and_fetching_ahead(tiny_data):
    cfg = full_config(tiny_data, "aioli")
    model, opt = model_and_optimizer(cfg)
    ds = MixingDataset(for_loop(cfg, "aioli", model, opt), GA)
    with pytest.raises(ConfigError, match="num_workers"):
        ds.loader(num_workers=1)
    with pytest.raises(ConfigError, match="num_workers=0"):  # a worker's error comes back
        next(iter(StatefulDataLoader(ds, batch_size=None, num_workers=1)))
    it = iter(ds.loader())
    next(it)
    with pytest.raises(CheckpointError, match="in flight"):
        ds.state_dict()
    with pytest.raises(ConfigError, match="before the losses of step 0"):
        next(it)  # what a loader that prefetches would do


def test_a_state_from_another_setup_is_refused(tiny_data):
    cfg = full_config(tiny_data, "aioli")
    model, opt = model_and_optimizer(cfg)
    state = MixingDataset(for_loop(cfg, "aioli", model, opt), GA).state_dict()
    other = MixingDataset(for_loop(cfg, "aioli", model, opt), 1)
    with pytest.raises(CheckpointError, match="micro_batches: saved 2, now 1"):
        other.load_state_dict(state)
