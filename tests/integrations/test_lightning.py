"""``MixlabCallback`` for PyTorch Lightning: a LightningModule around mixlab's tiny GPT, trained
by ``lightning.Trainer`` on CPU with a dynamic mixer whose plan moves (DGA, Aioli) or with
DWM's per-sample weights; the trajectory is the mixture and the training loss of every step.

Two answers the callback did not produce:
- an uninterrupted Lightning run: a run stopped after 4 steps with a checkpoint, then resumed
  with ``trainer.fit(ckpt_path=...)`` in fresh objects, gives the same trajectory, exactly
  (one CPU process, the same operations on the same restored state);
- ``mixlab train`` with the same seed and mixer: also exactly. The arithmetic is the same:
  the same model and AdamW param groups from the same seed, the loss Σ f_i w_i ℓ_i / b of each
  micro-batch (the callback returns it ×2 and Lightning divides by accumulate_grad_batches = 2,
  both exact in binary floating point), the same backward, clipping and learning rates. Two
  details a LightningModule must match for *bit*-identity (``LM(exact=True)``, documented in
  docs/lightning.md): Lightning's default clipping sums the gradient norms in the optimizer's
  parameter-group order (mixlab train: ``model.parameters()`` order), so the clip coefficient
  can differ in its last bit; and a LambdaLR sets lr·(f(t)/lr), which need not round to f(t)
  (here it happens to: measured identical). The plain module (``exact=False``) is compared
  with a tolerance, argued at its test.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.integrations.mixing_runs import (
    BATCH,
    CASES,
    GA,
    SEQ,
    STEPS,
    VOCAB,
    full_config,
    schedule,
    session_config,
    train_run,
    train_trajectory,
)

from mixlab.errors import CheckpointError
from mixlab.model import build_model, per_sample_loss
from mixlab.train.config import TrainConfig
from mixlab.train.loop import build_optimizer

L = pytest.importorskip("lightning.pytorch")
from mixlab.integrations.lightning import MixlabCallback, MixlabDataModule  # noqa: E402


class ScheduleLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets lr = f(t) of mixlab's schedule (a LambdaLR would set lr·(f(t)/lr))."""

    def __init__(self, opt: torch.optim.Optimizer, f):
        self.f = f
        super().__init__(opt)

    def get_lr(self) -> list[float]:
        return [self.f(self.last_epoch) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "f"}  # f: rebuilt, not saved


class LM(L.LightningModule):
    """mixlab's GPT in a LightningModule; ``exact``: schedule and clipping as mixlab train's."""

    def __init__(self, cfg: TrainConfig, mixlab: MixlabCallback, exact: bool = True):
        super().__init__()
        self.exact = exact
        torch.manual_seed(cfg.train.seed)  # the model mixlab train builds
        self.model = build_model(cfg.model, VOCAB, SEQ)
        self.cfg, self.mixlab = cfg, mixlab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.mixlab.loss(per_sample_loss(self.model, batch["tokens"]))

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.cfg)
        f, lr = schedule(self.cfg), self.cfg.optim.lr
        sched = ScheduleLR(opt, f) if self.exact else torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: f(t) / lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        if not self.exact:  # Lightning's own: norms summed in the param-group order
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        # In the model's parameter order, as mixlab train sums the norms.
        torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


class StopAt(L.Callback):
    """Checkpoint after ``step`` optimizer steps and stop (after MixlabCallback's end_step)."""

    def __init__(self, step: int, path: Path):
        self.step, self.path, self.done = step, path, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def run(data: Path, case: str, stop: StopAt | None = None, ckpt: Path | None = None,
        exact: bool = True) -> np.ndarray:
    """[n, m + 1] the mixture and the training loss of each step this Lightning run trains."""
    cfg = full_config(data, case)
    mixlab = MixlabCallback(data, CASES[case]["mixer"], CASES[case]["options"], batch_size=BATCH,
                            seq_len=SEQ, seed=cfg.train.seed, config=session_config(case),
                            lr_at=schedule(cfg), model=lambda m: m.model)
    trainer = L.Trainer(
        max_steps=STEPS, accumulate_grad_batches=GA, gradient_clip_val=cfg.optim.grad_clip,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[mixlab] + ([stop] if stop else []),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "few dataloader workers": num_workers=0 is required
        trainer.fit(LM(cfg, mixlab, exact), datamodule=MixlabDataModule(mixlab),
                    ckpt_path=str(ckpt) if ckpt else None)
    return np.array([[*h.weights, h.loss] for h in mixlab.history])


@pytest.mark.parametrize("case", ["dga", "aioli", "dwm"])
def test_lightning_resumes_exactly_and_equals_mixlab_train(tiny_data, tmp_path, case):
    """Mixtures and losses per step; the losses also check DWM's per-sample weights, whose
    model trains on the LM's gradient in on_before_optimizer_step."""
    full = run(tiny_data, case)
    assert full.shape == (STEPS, 4)
    if case != "dwm":  # the mixer moved: the losses reached it
        assert np.ptp(full[:, :3], axis=0).max() > 1e-2

    ckpt = tmp_path / "step4.ckpt"
    first = run(tiny_data, case, stop=StopAt(4, ckpt))
    rest = run(tiny_data, case, ckpt=ckpt)
    assert (len(first), len(rest)) == (4, STEPS - 4)
    np.testing.assert_array_equal(np.concatenate([first, rest]), full)

    # Bit-identical to mixlab train: the same arithmetic (module docstring).
    weights, losses = train_run(full_config(tiny_data, case), tmp_path / "train")
    np.testing.assert_array_equal(full, np.column_stack([weights, losses]))


def test_a_plain_lightning_module_is_close_to_mixlab_train(tiny_data, tmp_path):
    """Lightning's default clipping and a LambdaLR (``exact=False``). The clipping sums the
    16 float32 per-tensor norms in another order (6 matrices, then 10 vectors): the total
    norm, hence the clip coefficient, differs by about one float32 ulp (6e-8 relative) at each
    step where clipping engages, and the parameters drift by that order. DGA's mirror step
    carries the drift into the weights with a factor η·|a| ~ O(1) per update (3 updates in 10
    steps): measured 2.7e-7 relative (DGA) and 1.0e-7 (Aioli) on this CPU; rtol 1e-5 leaves
    ~40x for other CPUs and BLAS."""
    plain = run(tiny_data, "dga", exact=False)[:, :3]
    reference = train_trajectory(full_config(tiny_data, "dga"), tmp_path / "train")
    np.testing.assert_allclose(plain, reference, rtol=1e-5, atol=0)


def test_a_checkpoint_of_another_setup_is_refused(tiny_data, tmp_path):
    ckpt = tmp_path / "step2.ckpt"
    run(tiny_data, "aioli", stop=StopAt(2, ckpt))
    with pytest.raises(CheckpointError, match="mixer: saved 'aioli', now 'dga'"):
        run(tiny_data, "dga", ckpt=ckpt)


@pytest.mark.slow
def test_the_lightning_example_resumes_exactly(tiny_data, tmp_path):
    """examples/lightning_train.py: 12 steps in one go, and 12 steps stopped at 5 and resumed
    by a second invocation from OUT/last.ckpt, print the same last step (loss and mixture:
    the same only if the model, optimizer and mixer all resumed exactly)."""
    import subprocess
    import sys

    example = Path(__file__).parents[2] / "examples" / "lightning_train.py"

    def run_example(out: Path, *extra: str) -> str:
        proc = subprocess.run([sys.executable, str(example), "--data", str(tiny_data), "--out",
                               str(out), "--steps", "12", *extra], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip().splitlines()[-1]

    whole = run_example(tmp_path / "whole")
    assert run_example(tmp_path / "cut", "--stop-at", "5").startswith("step 5:")
    assert run_example(tmp_path / "cut", "--stop-at", "5") == whole
    assert whole.startswith("step 12:")
