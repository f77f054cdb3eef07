"""Dynamic data mixing in a Hugging Face ``Trainer`` run, stopped halfway and resumed.

    python examples/hf_trainer.py                      # data/builtin (mixlab prepare --source builtin)
    python examples/hf_trainer.py --data DIR --mixer odm --steps 60 --check

What it does:

1. builds a tiny randomly initialised GPT-2 (the data dir's vocabulary, nothing downloaded);
2. trains it with ``transformers.Trainer`` and a mixlab mixer (Aioli by default: its probe steps
   train on exact batch compositions, then it moves the mixture), checkpointing at
   ``--stop-at`` and stopping there as a preempted job would;
3. resumes in a fresh Trainer with a freshly built model (so everything comes from the checkpoint:
   weights, optimizer, scheduler, RNG, and mixlab's sampler and mixer in ``mixlab_state.pt``)
   and trains to ``--steps``;
4. with ``--check``, trains the same run uninterrupted and verifies that both end identically.

The mixlab part is three arguments of the Trainer; everything else is an ordinary Trainer run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mixlab.data.format import DataDir
from mixlab.integrations.hf import MixlabCallback

# Options that fit a run of a few dozen steps (the published defaults assume thousands).
SHORT_RUN_OPTIONS: dict[str, dict] = {
    "aioli": {"round_steps": 15, "lp_rounds": 1, "lp_steps": 2, "eta": 1.0},
    "odm": {},
    "doremi": {},
}


def build_model(vocab_size: int, seq_len: int, seed: int) -> torch.nn.Module:
    """A 2-layer GPT-2 with random weights from ``seed`` (~0.6M parameters at vocab 8192)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=None, eos_token_id=None,  # mixlab's tokenizer, not GPT-2's
    )
    return transformers.GPT2LMHeadModel(config)


def run(args: argparse.Namespace, out: Path, stop_at: int | None, resume: bool, model_seed: int):
    """One ``trainer.train()``; returns the callback (its ``history`` and ``mixer``)."""
    import transformers

    class StopAt(transformers.TrainerCallback):
        """Ends training after step ``stop_at`` (once its checkpoint is written), as a job
        killed by the scheduler would."""

        def on_step_end(self, targs, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    data = DataDir.open(args.data)
    mixlab = MixlabCallback(
        data, args.mixer, SHORT_RUN_OPTIONS.get(args.mixer, {}), seq_len=args.seq_len,
        eval_windows=8,
    )
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        warmup_steps=2,
        save_strategy="steps",
        save_steps=args.stop_at,
        logging_steps=10,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=build_model(data.vocab_size, args.seq_len, model_seed),
        args=targs,
        train_dataset=mixlab.train_dataset,      # placeholders; the callback fills the tokens
        compute_loss_func=mixlab.compute_loss,   # per-sample losses, w/q loss weights
        callbacks=[mixlab, StopAt()],
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    return mixlab


def show(cb: MixlabCallback, title: str) -> None:
    print(f"\n{title}")
    print(f"  step  phase  loss    mixture ({', '.join(cb.domains)})")
    for h in cb.history:
        mix = " ".join(f"{w:.3f}" for w in h.weights)
        print(f"  {h.step + 1:4d}  {h.phase:5s}  {h.loss:.3f}   {mix}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/builtin", help="a mixlab data dir (mixlab prepare)")
    p.add_argument("--out", default="runs/hf_trainer", help="the Trainer's output_dir")
    p.add_argument("--mixer", default="aioli", help="any mixer the integration supports")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--stop-at", type=int, default=None, help="checkpoint and stop here (steps/2)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--check", action="store_true", help="also train uninterrupted and compare")
    args = p.parse_args(argv)
    args.stop_at = args.stop_at or args.steps // 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} is not empty; choose another or remove it.")
    torch.set_num_threads(min(4, os.cpu_count() or 1))

    first = run(args, out, stop_at=args.stop_at, resume=False, model_seed=0)
    show(first, f"Part 1: trained to step {args.stop_at}, checkpoint {out}/checkpoint-{args.stop_at}")
    # Another model seed: if resuming did not restore the weights, the run would diverge.
    second = run(args, out, stop_at=None, resume=True, model_seed=123)
    show(second, f"Part 2: resumed from step {args.stop_at} to {args.steps}")
    final = second.history[-1]
    print(f"\nfinal mixture: {dict(zip(second.domains, np.round(final.weights, 4).tolist()))}")
    print(f"eval loss per domain (mixer's subset): "
          f"{dict(zip(second.domains, np.round(second.eval_losses(args.steps), 3).tolist()))}")

    if args.check:
        whole = run(args, out.with_name(out.name + "_uninterrupted"), None, False, model_seed=0)
        same = [h.loss for h in whole.history] == [h.loss for h in first.history + second.history]
        same &= whole.mixer.state_dict() == second.mixer.state_dict()
        print(f"\nuninterrupted run ends identically: {same}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
