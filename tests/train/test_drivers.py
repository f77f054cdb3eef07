"""Same mixer, same numbers, any driver: ``mixlab train`` (a), a loop of the user's own on
``MixingSession.for_loop`` (b) and the Hugging Face Trainer with ``MixlabCallback`` (c) train
the same tiny GPT-2 (``model.kind = "hf"``, built by mixlab from the same seed) with the same
mixer, and their mixture trajectories (the plan of every step) are compared.

(a) vs (b) must be bit-identical: both run the same session with the same model, optimizer,
schedule and clipping, in the same order of operations. (c) runs the Trainer's own step
(accelerate's backward and clipping, its LambdaLR over mixlab's schedule, the optimizer
mixlab builds); on one CPU process these are the same float operations in the same order, so
the trajectories are compared exactly too. What may differ elsewhere (another accelerate
version that reorders the gradient clipping, bf16 autocast on a GPU) is not tested here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.mixers.align_fakes import add_hierarchy

from mixlab.model import build_model, per_sample_loss, token_losses
from mixlab.train.config import TrainConfig, load_config
from mixlab.train.loop import build_optimizer, train
from mixlab.train.schedule import lr_at
from mixlab.train.session import MixingSession

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
transformers.logging.set_verbosity_error()

STEPS, BATCH, GA, SEQ = 12, 8, 2, 16
TARGET = {"domain": "c", "docs": 6}
CASES: dict[str, dict[str, Any]] = {
    "aioli": {"mixer": "aioli", "options": {"round_steps": 6, "lp_rounds": 1, "lp_steps": 1}},
    "aioli_branch": {"mixer": "aioli", "options": {"round_steps": 4, "lp_rounds": 1, "lp_steps": 1,
                                                   "probes": "branch", "variant": "adaptive"}},
    "dga": {"mixer": "dga", "options": {"update_every": 3, "align_samples": 5, "target_windows": 3},
            "extra": {"target": TARGET}},
    "dga_basis": {"mixer": "dga", "options": {"update_every": 3, "align_samples": 5,
                                              "basis": "importance"}, "extra": {"target": TARGET}},
    "doge": {"mixer": "doge", "options": {"update_every": 3, "apply": "sample"}},
    "skillit": {"mixer": "skillit", "options": {"graph_steps": 2, "update_every": 4, "eval_every": 2}},
    "doremi": {"mixer": "doremi", "options": {"sampling": "alpha"}},
    "dwm": {"mixer": "stratified", "options": {}, "extra": {"weighting": {"name": "dwm"}}},
}
HF_MODEL = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def base(data: Path) -> dict[str, Any]:
    """The sections every driver shares (besides data, steps, batch, mixer)."""
    return {
        "model": {"kind": "hf", "hf_options": dict(HF_MODEL)},
        "optim": {"warmup_steps": 3, "lr": 1e-2},
        "eval": {"every": 0, "windows": 4, "signal_windows": 4, "test_windows": 4, "batch_size": 8},
    }


@pytest.fixture
def world(tiny_data, tmp_path):
    """The data dir (with a cluster hierarchy, for DGA's bases) and a stratified reference run."""
    add_hierarchy(tiny_data, [0, 0, 1])
    ref = tmp_path / "ref"
    train(full_config(tiny_data, "stratified", {}, {}), ref)
    return tiny_data, ref


def extra_for(case: str, ref: Path) -> dict[str, Any]:
    extra = dict(CASES[case].get("extra", {}))
    if CASES[case]["mixer"] == "doremi":
        extra["mixer"] = {"reference": str(ref)}
    return extra


def full_config(data: Path, mixer: str, options: dict, extra: dict) -> TrainConfig:
    """The ``mixlab train`` config of a case."""
    from mixlab.config import from_dict
    from mixlab.train.session import merge_config

    raw = merge_config(base(data), extra)
    raw = merge_config(raw, {
        "data": {"dir": str(data), "seq_len": SEQ},
        "train": {"steps": STEPS, "batch_size": BATCH, "grad_accum": GA, "log_every": 1,
                  "progress": False, "seed": 0},
        "mixer": {"name": mixer, "options": options},
    })
    return from_dict(TrainConfig, raw)


def schedule(cfg: TrainConfig):
    o = cfg.optim
    return lambda step: lr_at(step, o.lr, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)


# ----------------------------------------------------------------------------- (a) mixlab train


def run_a(cfg: TrainConfig, out: Path) -> np.ndarray:
    train(cfg, out)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    domains = cfg.data.domains or ["a", "b", "c"]
    return np.array([[r["weights"][d] for d in domains] for r in lines if r["kind"] == "train"])


# ----------------------------------------------------------------------------- (b) own loop


def run_b(cfg: TrainConfig, data: Path, case: str, extra: dict, out: Path,
          stop_after: int | None = None) -> np.ndarray:
    """A plain loop on the session; with ``stop_after`` it saves a checkpoint of its own
    making after that many steps and returns; a later call resumes from it."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, 64, SEQ)
    opt = build_optimizer(model, cfg)
    session = MixingSession.for_loop(
        model, opt, data=data, steps=STEPS, batch_size=BATCH, seq_len=SEQ,
        mixer=CASES[case]["mixer"], mixer_options=CASES[case]["options"], micro_batches=GA,
        config={**{k: v for k, v in base(data).items() if k != "model"}, **extra},
        lr_at=schedule(cfg),
    )
    ckpt = out / "ckpt.pt"
    weights: list[np.ndarray] = []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        session.load_state_dict(state["session"])
        torch.set_rng_state(state["rng"])
    for step in range(session.step, STEPS):
        st = session.begin_step(step, GA)
        for group in opt.param_groups:
            group["lr"] = st.lr
        opt.zero_grad(set_to_none=True)
        for k in range(GA):
            x = st.tokens(k)
            tok = token_losses(model(x[:, :-1]), x[:, 1:]) if session.wants_token_losses else None
            losses = tok.mean(dim=1) if tok is not None else per_sample_loss(model, x)
            session.loss(st, k, losses, tok).backward()
        session.before_optimizer_step(st)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        session.end_step(st)
        weights.append(np.asarray(st.plan.weights))
        if stop_after is not None and step + 1 == stop_after:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "session": session.state_dict(), "rng": torch.get_rng_state()}, ckpt)
            break
    return np.array(weights)


# ----------------------------------------------------------------------------- (c) HF Trainer


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def run_c(cfg: TrainConfig, data: Path, case: str, extra: dict, out: Path,
          stop_after: int | None = None, resume: bool = False) -> np.ndarray:
    from mixlab.integrations.hf import MixlabCallback

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, 64, SEQ).hf
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(cfg)(s) / cfg.optim.lr)
    cb = MixlabCallback(
        data, CASES[case]["mixer"], CASES[case]["options"], seq_len=SEQ, seed=cfg.train.seed,
        eval_windows=cfg.eval.signal_windows, eval_batch_size=cfg.eval.batch_size,
        config={"eval": {"windows": 4, "test_windows": 4}, **extra},
    )
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH // GA,
        gradient_accumulation_steps=GA, learning_rate=cfg.optim.lr,
        max_grad_norm=cfg.optim.grad_clip, use_cpu=True, report_to=[], logging_steps=1,
        disable_tqdm=True, seed=cfg.train.seed, save_strategy="no",
    )
    callbacks = [cb] + ([_StopAt(stop_after)] if stop_after else [])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=cb.train_dataset,
                                   compute_loss_func=cb.compute_loss, callbacks=callbacks,
                                   optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume or None)
    return np.array([h.weights for h in cb.history])


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_driver_gives_the_same_mixture_trajectory(world, tmp_path, case):
    data, ref = world
    extra = extra_for(case, ref)
    cfg = full_config(data, CASES[case]["mixer"], CASES[case]["options"], extra)
    a = run_a(cfg, tmp_path / "a")
    b = run_b(cfg, data, case, extra, tmp_path / "b")
    c = run_c(cfg, data, case, extra, tmp_path / "c")
    assert a.shape == (STEPS, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    if case != "dwm":  # the mixture moved: the comparison is not between constants
        assert np.ptp(a, axis=0).max() > 1e-3


@pytest.mark.parametrize("case", sorted(CASES))
def test_own_loop_and_trainer_resume_exactly(world, tmp_path, case):
    data, ref = world
    extra = extra_for(case, ref)
    cfg = full_config(data, CASES[case]["mixer"], CASES[case]["options"], extra)
    full_b = run_b(cfg, data, case, extra, tmp_path / "b_full")
    first = run_b(cfg, data, case, extra, tmp_path / "b_cut", stop_after=5)
    rest = run_b(cfg, data, case, extra, tmp_path / "b_cut")
    np.testing.assert_array_equal(np.concatenate([first, rest]), full_b)

    full_c = run_c(cfg, data, case, extra, tmp_path / "c_full")
    first = run_c(cfg, data, case, extra, tmp_path / "c_cut", stop_after=6)
    rest = run_c(cfg, data, case, extra, tmp_path / "c_cut", resume=True)
    np.testing.assert_array_equal(np.concatenate([first, rest]), full_c)


def test_a_driver_without_a_capability_refuses_the_mixer_up_front(tiny_data):
    from mixlab.errors import ConfigError
    from mixlab.train.session import RunView

    cfg = load_config(None, [f"data.dir='{tiny_data}'", "data.seq_len=16", "train.batch_size=8",
                             "mixer.name='skillit'"])
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="needs copies of the model and its optimizer"):
        MixingSession(cfg, RunView(model=model, provides=frozenset({"full_model"})))
    with pytest.raises(ConfigError, match="unsharded parameters"):
        MixingSession(cfg, RunView(model=model, provides=frozenset()))


@pytest.mark.slow
def test_dga_in_the_trainer_on_two_processes_equals_one(tiny_data, tmp_path):
    """torchrun, 2 gloo processes x per_device 2 x GA 2 = the one-process global batch of 8
    (per_device 4 x GA 2). The batches are the same; each rank computes the alignments of its
    rows and the target gradient of its windows, summed over ranks (float32 sums in another
    grouping and other matmul shapes: relative error ~1e-7 per value). With jvp alignments
    (exact up to rounding) DGA's mirror step carries that into the weights with a factor
    η·|a| ~ O(1) per update: measured 2.0e-7 relative after 4 updates; rtol 1e-5 leaves 50x
    for other CPUs. (fd alignments divide the per-sample rounding of ℓ(θ ± εv) by 2ε: the
    same comparison measured 4.4e-4, which is why this test uses jvp.)"""
    import os
    import socket
    import subprocess
    import sys

    from mixlab.integrations.hf import MixlabCallback

    spec = {"mixer": "dga", "options": {"update_every": 2, "align_samples": 6, "method": "jvp"},
            "config": {"target": TARGET}}
    worker = Path(__file__).parents[1] / "integrations" / "hf_ddp_worker.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), str(worker), str(tiny_data), str(tmp_path), "2", "2", "8", json.dumps(spec)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["world"] == 2

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config)
    one = MixlabCallback(tiny_data, spec["mixer"], spec["options"], seq_len=16, eval_windows=4,
                         config=spec["config"])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "one"), max_steps=8, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=one.train_dataset,
                         compute_loss_func=one.compute_loss, callbacks=[one]).train()
    weights = np.array([h.weights for h in one.history])
    assert np.ptp(weights, axis=0).max() > 1e-3  # DGA moved the mixture
    assert r0["drawn"] == [h.drawn.tolist() for h in one.history]
    np.testing.assert_allclose(r0["weights"], weights, rtol=1e-5, atol=0)


def test_the_own_loop_example_trains_and_resumes(tiny_data, tmp_path):
    """examples/own_loop.py: 50 steps in one go equal 50 steps, then a second invocation that
    resumes from its checkpoint and trains 50 more (the mixture after 100 steps is printed by
    both the same way only if the resume is exact)."""
    import subprocess
    import sys

    example = Path(__file__).parents[2] / "examples" / "own_loop.py"

    def run(out: Path, steps: int) -> str:
        proc = subprocess.run([sys.executable, str(example), str(tiny_data), str(out), "--mixer",
                               "odm", "--steps", str(steps)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    whole = run(tmp_path / "whole", 100)
    assert (tmp_path / "whole" / "ckpt.pt").is_file()
    run(tmp_path / "cut", 50)
    resumed = run(tmp_path / "cut", 100)  # starts at step 50 from the checkpoint
    assert resumed.splitlines()[-2:] == whole.splitlines()[-2:]
