"""Any mixlab mixer in a plain PyTorch loop of your own (``MixingSession.for_loop``).

    python examples/own_loop.py DATA_DIR OUT_DIR [--mixer dga] [--steps 200]

Your model (here mixlab's GPT; a transformers model works through
``mixlab.model.hf.HFCausalLM.view(model)``), your optimizer, your schedule, your checkpoint:
the session gives each step's batch and computes the signals the mixer asks for. Run it again
with the same arguments after an interruption and it resumes from OUT_DIR/ckpt.pt exactly.
"""

import argparse
from pathlib import Path

import torch

from mixlab.data.format import DataDir
from mixlab.model import GPT, sequence_losses
from mixlab.train.session import MixingSession

p = argparse.ArgumentParser()
p.add_argument("data"), p.add_argument("out")
p.add_argument("--mixer", default="dga"), p.add_argument("--steps", type=int, default=200)
a = p.parse_args()
data, out, seq = DataDir.open(a.data), Path(a.out), 64
torch.manual_seed(0)
model = GPT(data.vocab_size, seq, n_layer=2, n_head=2, d_model=64)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
target = {"target": {"domain": data.domains[0], "docs": 20}} if a.mixer in ("dga", "importance") else {}
session = MixingSession.for_loop(model, opt, data=data, mixer=a.mixer, steps=a.steps,
                                 batch_size=16, seq_len=seq, config=target)
ckpt = out / "ckpt.pt"
if ckpt.exists():  # a checkpoint of our own making: model, optimizer and the session's state
    state = torch.load(ckpt, weights_only=True)
    model.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
    session.load_state_dict(state["mixing"])
for step in range(session.step, a.steps):
    st = session.begin_step(step)                       # plan and this step's batch
    x = st.tokens(0)                                    # [16, seq + 1]
    losses = sequence_losses(model(x[:, :-1]), x[:, 1:])  # per-sample losses [16]
    opt.zero_grad()
    session.loss(st, 0, losses).backward()              # weighted as the mixer's plan says
    session.before_optimizer_step(st)
    opt.step()
    session.end_step(st)                                # the mixer observes the step
    if (step + 1) % 50 == 0 or step + 1 == a.steps:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "ckpt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "mixing": session.state_dict()}, tmp)
        tmp.replace(ckpt)
        print(f"step {step + 1}: loss {losses.mean():.3f}, mixture "
              + ", ".join(f"{d} {w:.2f}" for d, w in zip(session.domains, st.plan.weights)))
print("val:", {d: round(v, 3) for d, v in session.evaluate("val")["loss"].items()})
