"""Synthetic run dirs written exactly as docs/architecture.md ("Run directory") specifies, so
compare and report are tested without training anything."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mixlab.config import to_dict
from mixlab.train.config import load_config

DOMAINS = ["code", "legal", "news"]


def write_run(
    run_dir: Path,
    mixer: str,
    seed: int,
    ppl: dict[str, float] | None,
    *,
    steps: int = 40,
    wall_time_s: float = 10.0,
    extra_steps: int = 0,
    target_loss: float | None = None,
    overrides: list[str] | None = None,
    config: dict[str, Any] | None = None,
    finished: bool = True,
) -> Path:
    """Write config.toml, metrics.jsonl (train lines every 10 steps, eval every 20) and, when
    ``finished``, summary.json whose test perplexities are ``ppl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    domains = list(ppl) if ppl else DOMAINS
    m = len(domains)
    if config is None:
        config = to_dict(
            load_config(None, [f"mixer.name={mixer}", f"train.seed={seed}",
                               f"train.steps={steps}", *(overrides or [])])
        )  # fmt: skip
    (run_dir / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    tokens_per_step = 16 * 128
    lines = []
    for step in range(10, steps + 1, 10):
        # A trajectory that moves: weight shifts from uniform toward the first domain.
        shift = 0.3 * step / steps if mixer != "stratified" else 0.0
        w = [
            1.0 / m + shift * (1 - 1.0 / m) if i == 0 else (1.0 / m) * (1 - shift) for i in range(m)
        ]
        lines.append(
            {"kind": "train", "step": step, "tokens": step * tokens_per_step, "lr": 0.001,
             "loss": 5.0 - step / 100, "domain_loss": {d: 5.0 - step / 100 for d in domains},
             "weights": dict(zip(domains, w)), "phase": "train", "tokens_per_s": 1000.0,
             "elapsed_s": step / 4}
        )  # fmt: skip
        if step % 20 == 0:
            loss = {d: 6.0 - step / 50 - 0.1 * i - 0.01 * seed for i, d in enumerate(domains)}
            lines.append(
                {"kind": "eval", "step": step, "tokens": step * tokens_per_step, "split": "val",
                 "loss": loss, "ppl": {d: math.exp(v) for d, v in loss.items()},
                 "avg_loss": sum(loss.values()) / m,
                 "avg_ppl": sum(math.exp(v) for v in loss.values()) / m, "target_loss": None}
            )  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished and ppl:
        test = {
            "loss": {d: math.log(v) for d, v in ppl.items()},
            "ppl": dict(ppl),
            "avg_loss": sum(math.log(v) for v in ppl.values()) / m,
            "avg_ppl": sum(ppl.values()) / m,
            "target_loss": target_loss,
        }
        summary = {
            "mixlab_version": "0.1.0", "mixer": mixer, "seed": seed, "steps": steps,
            "tokens": steps * tokens_per_step, "domains": domains, "test": test, "val": test,
            "weights_final": lines[-2]["weights"] if len(lines) > 1 else {},
            "weights_avg": {d: 1.0 / m for d in domains},
            "tokens_per_domain": {d: steps * tokens_per_step // m for d in domains},
            "epochs_per_domain": {d: 0.5 * (i + 1) for i, d in enumerate(domains)},
            "wall_time_s": wall_time_s, "tokens_per_s": 1000.0, "nonfinite_steps": 0,
            "extra_steps": extra_steps,
        }  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def make_run() -> Callable[..., Path]:
    return write_run
