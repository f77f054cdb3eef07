"""What the torch-data and Lightning driver tests share: one tiny run (mixlab's own GPT, a
dynamic mixer) and the ``mixlab train`` trajectory of that run, the reference they compare to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixlab.config import from_dict
from mixlab.model import build_model
from mixlab.train.config import TrainConfig
from mixlab.train.loop import build_optimizer, train
from mixlab.train.schedule import lr_at
from mixlab.train.session import MixingSession, merge_config

STEPS, BATCH, GA, SEQ, VOCAB = 10, 8, 2, 16, 64
CASES: dict[str, dict[str, Any]] = {
    # DGA: mirror steps every 3 steps on alignments with a target set (moves from step 3).
    "dga": {"mixer": "dga", "options": {"update_every": 3, "align_samples": 5, "target_windows": 3},
            "extra": {"target": {"domain": "c", "docs": 6}}},
    # Aioli: probe rounds of 4 steps (exact probe counts), then the learned mixture.
    "aioli": {"mixer": "aioli", "options": {"round_steps": 4, "lp_rounds": 1, "lp_steps": 1},
              "extra": {}},
    # DWM: a constant mixture, per-sample weights from a model trained on the LM's gradient.
    "dwm": {"mixer": "stratified", "options": {}, "extra": {"weighting": {"name": "dwm"}}},
}
SHARED: dict[str, Any] = {
    "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32},
    "optim": {"warmup_steps": 3, "lr": 1e-2},
    "eval": {"every": 0, "windows": 4, "signal_windows": 4, "test_windows": 4, "batch_size": 8},
}
"""The sections every driver shares, besides data, steps, batch and mixer."""


def full_config(data: Path, case: str) -> TrainConfig:
    """The ``mixlab train`` config of a case."""
    c = CASES[case]
    raw = merge_config(SHARED, c["extra"])
    raw = merge_config(raw, {
        "data": {"dir": str(data), "seq_len": SEQ},
        "train": {"steps": STEPS, "batch_size": BATCH, "grad_accum": GA, "log_every": 1,
                  "progress": False, "seed": 0},
        "mixer": {"name": c["mixer"], "options": c["options"]},
    })
    return from_dict(TrainConfig, raw)


def session_config(case: str) -> dict[str, Any]:
    """``MixingSession.for_loop(config=...)`` of a case: the shared sections but the model."""
    return {**{k: v for k, v in SHARED.items() if k != "model"}, **CASES[case]["extra"]}


def schedule(cfg: TrainConfig):
    o = cfg.optim
    return lambda step: lr_at(step, o.lr, o.warmup_steps, cfg.train.steps, o.min_lr_ratio)


def model_and_optimizer(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer ``mixlab train`` builds, from the same seed."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, VOCAB, SEQ)
    return model, build_optimizer(model, cfg)


def train_run(cfg: TrainConfig, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """``mixlab train``'s [steps, m] mixture and [steps] training loss of every step (its
    metrics.jsonl, logged every step)."""
    train(cfg, out)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if r["kind"] == "train"]
    return (np.array([[r["weights"][d] for d in ("a", "b", "c")] for r in rows]),
            np.array([r["loss"] for r in rows]))


def train_trajectory(cfg: TrainConfig, out: Path) -> np.ndarray:
    """[steps, m] the mixture of every step of ``mixlab train``."""
    return train_run(cfg, out)[0]


def for_loop(cfg: TrainConfig, case: str, model: torch.nn.Module,
             opt: torch.optim.Optimizer) -> MixingSession:
    return MixingSession.for_loop(
        model, opt, data=cfg.data.dir, steps=STEPS, batch_size=BATCH, seq_len=SEQ,
        mixer=CASES[case]["mixer"], mixer_options=CASES[case]["options"], micro_batches=GA,
        config=session_config(case), lr_at=schedule(cfg),
    )
