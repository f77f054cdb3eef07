from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mixlab.train.config import TrainConfig, load_config


def tiny_overrides(data_dir, out_extra=()) -> list[str]:
    return [
        f"data.dir='{data_dir}'",
        "data.seq_len=16",
        "model.d_model=32",
        "model.n_layer=1",
        "model.n_head=2",
        "train.steps=24",
        "train.batch_size=8",
        "train.log_every=4",
        "train.progress=false",
        "optim.warmup_steps=4",
        "eval.every=8",
        "eval.windows=8",
        "eval.signal_windows=4",
        "eval.test_windows=8",
        *out_extra,
    ]


@pytest.fixture
def tiny_cfg(tiny_data):
    def make(*extra: str):
        return load_config(None, tiny_overrides(tiny_data, extra))

    return make


def metrics_lines(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl without the fields that measure time."""
    out = []
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        rec.pop("tokens_per_s", None)
        rec.pop("elapsed_s", None)
        out.append(rec)
    return out


def die_after(step_fn: Callable, n: int) -> Callable:
    """``Trainer.train_step`` that raises SystemExit at call n + 1 (a SIGKILL: no checkpoint)."""
    calls = {"n": 0}

    def wrapped(plan):
        calls["n"] += 1
        if calls["n"] > n:
            raise SystemExit("killed")
        return step_fn(plan)

    return wrapped


def assert_resume_identical(make_cfg: Callable[[], TrainConfig], tmp_path: Path, kill_after: int) -> dict:
    """Train to the end in tmp_path/full; train again in tmp_path/cut, killed after
    ``kill_after`` steps, then resumed; assert both runs wrote the same summary and metrics
    (timing aside). Returns the full run's summary."""
    from mixlab.train.loop import TIMING_KEYS, Trainer, train

    full = train(make_cfg(), tmp_path / "full")
    trainer = Trainer(make_cfg(), tmp_path / "cut")
    trainer.train_step = die_after(trainer.train_step, kill_after)
    with pytest.raises(SystemExit):
        trainer.run()
    resumed = train(make_cfg(), tmp_path / "cut", resume=True)

    def strip(s: dict) -> dict:
        return {k: v for k, v in s.items() if k not in TIMING_KEYS}

    assert strip(resumed) == strip(full)
    assert metrics_lines(tmp_path / "cut") == metrics_lines(tmp_path / "full")
    return full
