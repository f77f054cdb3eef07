"""One run of many: its spec, and what to do with its run dir (reuse, resume, start afresh).

A ``RunSpec`` is what ``mixlab compare``, ``mixlab sweep`` and the benchmarks hand to the
scheduler (``mixlab.orchestrate.scheduler.run_all``): the run's resolved config, where it is
written, and which runs must finish first. ``run_state`` decides from the run dir on disk
whether a run is reused (``summary.json`` and a matching config), resumed (a checkpoint) or
trained afresh.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixlab.config import to_dict
from mixlab.errors import MixlabError
from mixlab.report.runs import CONFIG, SUMMARY


@dataclass
class RunSpec:
    """One run of many (a comparison's, a sweep's, a benchmark's): what ``run_all`` schedules."""

    mixer: str
    seed: int
    run_dir: Path
    config_path: Path
    config: dict[str, Any]
    """The run's resolved config (what ``config_path`` holds)."""
    steps: int
    """Training steps (``train.steps``): the progress line's denominator."""
    needs: list[str] = field(default_factory=list)
    """Keys of runs that must finish first (a reference model)."""

    @property
    def key(self) -> str:
        """``<mixer>/seed<k>``: the run's name in outcomes, ``needs`` and progress lines."""
        return f"{self.mixer}/seed{self.seed}"


def write_configs(specs: list[RunSpec]) -> None:
    """Write each spec's resolved config to its ``config_path`` (the ``mixlab train`` input)."""
    import tomli_w

    for spec in specs:
        spec.config_path.parent.mkdir(parents=True, exist_ok=True)
        spec.config_path.write_text(tomli_w.dumps(spec.config), encoding="utf-8")


def config_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: run has X, plan has Y'.

    Keys that may change on resume without changing the result (threads, device, checkpoint
    cadence: ``mixlab.train.checkpoint.RESUME_FREE_KEYS``) are ignored, so a comparison rerun
    with another ``--jobs`` reuses its runs.
    """
    from mixlab.train.checkpoint import RESUME_FREE_KEYS, flatten

    a, b = flatten(expected), flatten(actual)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE_KEYS or a.get(key) == b.get(key):
            continue
        diffs.append(
            f"{key}: run has {b.get(key, '(unset)')!r}, plan has {a.get(key, '(unset)')!r}"
        )
    return diffs


def _normalised_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.toml passed through TrainConfig, so defaults compare equal."""
    from mixlab.train.config import load_config

    return to_dict(load_config(run_dir / CONFIG))


RunState = Literal["done", "resume", "fresh"]


def run_state(spec: RunSpec, force: bool = False) -> RunState:
    """What to do with a run: 'done' (reuse), 'resume' (checkpoint found) or 'fresh'.

    A run dir made with another config is an error (its results would be mislabelled) unless
    ``force``, which deletes it. A dir left by a run that died before its first checkpoint is
    cleared: there is nothing in it to resume.
    """
    d = spec.run_dir
    if not d.exists():
        return "fresh"
    if (d / CONFIG).is_file():
        diffs = config_differences(spec.config, _normalised_run_config(d))
        if diffs:
            if not force:
                raise MixlabError(
                    f"{d} was made with another config ({'; '.join(diffs[:3])}"
                    f"{'; ...' if len(diffs) > 3 else ''}). Use another --out, or --force to "
                    "delete and redo such runs."
                )
            shutil.rmtree(d)
            return "fresh"
    if (d / SUMMARY).is_file():
        return "done"
    ckpt = d / "checkpoints"
    if ckpt.is_dir() and any(ckpt.iterdir()):
        return "resume"
    shutil.rmtree(d)
    return "fresh"

