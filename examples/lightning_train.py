"""Any mixlab mixer in a PyTorch Lightning run, checkpointed and resumable (docs/lightning.md).

    python examples/lightning_train.py                 # data/builtin (mixlab prepare --source builtin)
    python examples/lightning_train.py --data DIR --out OUT --mixer aioli --steps 60 --stop-at 30

A tiny GPT (mixlab's, on the data dir's vocabulary: nothing downloaded) in a LightningModule;
the mixer picks each step's batch and learns from the per-sample losses the module returns.
Checkpoints go to OUT/last.ckpt every 10 steps; ``--stop-at N`` stops after N steps, as a
preempted job would. Run it again with the same arguments and it resumes from there exactly.
"""

import argparse
from pathlib import Path

import lightning.pytorch as L
import torch

from mixlab.data.format import DataDir
from mixlab.integrations.lightning import MixlabCallback, MixlabDataModule
from mixlab.model import GPT, per_sample_loss

p = argparse.ArgumentParser()
p.add_argument("--data", default="data/builtin"), p.add_argument("--out", default="runs/lightning")
p.add_argument("--mixer", default="aioli"), p.add_argument("--steps", type=int, default=60)
p.add_argument("--stop-at", type=int, default=0)
a = p.parse_args()
data, seq = DataDir.open(a.data), 64
# Options that fit a run of a few dozen steps (the published defaults assume thousands).
options = {"aioli": {"round_steps": 15, "lp_rounds": 1, "lp_steps": 2, "eta": 1.0}}.get(a.mixer, {})
mixlab = MixlabCallback(data, a.mixer, options, batch_size=16, seq_len=seq,
                        model=lambda module: module.net)  # the network the signals evaluate


class LM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = GPT(data.vocab_size, seq, n_layer=2, n_head=2, d_model=64)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = per_sample_loss(self.net, batch["tokens"])  # [micro] from tokens [micro, seq+1]
        return mixlab.loss(losses)                           # weighted as the mixer's plan says

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class StopAt(L.Callback):  # a preempted job: checkpoint, then stop
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if mixlab.history and mixlab.history[-1].step + 1 == a.stop_at == trainer.global_step:
            trainer.save_checkpoint(out / "last.ckpt")
            trainer.should_stop = True


out = Path(a.out)
ckpt = L.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=10, save_last=True,
                                   save_top_k=0)
trainer = L.Trainer(max_steps=a.steps, accumulate_grad_batches=2, gradient_clip_val=1.0,
                    accelerator="cpu", callbacks=[mixlab, ckpt, StopAt()], logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
last = out / "last.ckpt"
trainer.fit(LM(), datamodule=MixlabDataModule(mixlab), ckpt_path=last if last.exists() else None)
for h in mixlab.history[-1:]:
    print(f"step {h.step + 1}: loss {h.loss:.3f}, mixture "
          + ", ".join(f"{d} {w:.3f}" for d, w in zip(mixlab.session.domains, h.weights)))
