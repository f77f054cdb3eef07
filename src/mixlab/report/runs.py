"""Read run dirs written by ``mixlab train`` (see docs/architecture.md, "Run directory").

A run dir holds ``config.toml``, ``metrics.jsonl`` (one JSON object per line, ``kind`` = "train"
or "eval") and, once finished, ``summary.json``. A compare dir holds run dirs at
``runs/<mixer>/seed<k>/``. Readers here are tolerant of a run still being written: a last line
cut in the middle is ignored, and a run without ``summary.json`` is simply not finished.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.errors import MixlabError

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
RUNS = "runs"
PLAN_FILE = "compare.json"
"""A compare dir's plan: methods, seeds, baseline, run dirs (``mixlab.orchestrate.compare``)."""

_SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclass
class Run:
    """One run dir and what it has written so far."""

    path: Path
    summary: dict[str, Any] | None
    """Contents of summary.json, or None while the run has not finished."""
    train: list[dict[str, Any]] = field(default_factory=list)
    """The ``kind == "train"`` lines of metrics.jsonl, in file order."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """The ``kind == "eval"`` lines of metrics.jsonl, in file order."""
    config: dict[str, Any] = field(default_factory=dict)
    """The run's resolved config.toml as a dict (empty when missing)."""
    label: str = ""
    """The method name shown in tables and legends (the mixer, unless disambiguated)."""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def mixer(self) -> str:
        """The method: the mixer's name, with '+dwm' when samples were weighted by a DWM."""
        if self.summary and self.summary.get("mixer"):
            name = str(self.summary["mixer"])
        else:
            name = self.config.get("mixer", {}).get("name") or ""
            if not name:
                return self.path.name
        weighting = self.config.get("weighting", {}).get("name", "none")
        if self.summary and isinstance(self.summary.get("weighting"), dict):
            weighting = self.summary["weighting"].get("name", weighting)
        return f"{name}+{weighting}" if weighting and weighting != "none" else str(name)

    @property
    def seed(self) -> int:
        if self.summary and self.summary.get("seed") is not None:
            return int(self.summary["seed"])
        seed = self.config.get("train", {}).get("seed")
        if seed is not None:
            return int(seed)
        match = _SEED_DIR.match(self.path.name)
        return int(match.group(1)) if match else 0

    @property
    def domains(self) -> list[str]:
        """Domain names in the run's order (summary, else the first line that names them)."""
        if self.summary and self.summary.get("domains"):
            return list(self.summary["domains"])
        for line in self.train:
            if isinstance(line.get("weights"), dict):
                return list(line["weights"])
        for line in self.evals:
            if isinstance(line.get("loss"), dict):
                return list(line["loss"])
        return []


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, eval lines) of a metrics.jsonl; a missing file gives two empty lists.

    A line that is not valid JSON is skipped: the last one may be half-written by a live run.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        return train, evals
    with path.open(encoding="utf-8") as fh:
        for raw in fh:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if not isinstance(line, dict):
                continue
            if line.get("kind") == "train":
                train.append(line)
            elif line.get("kind") == "eval":
                evals.append(line)
    return train, evals


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of a run dir, or None when the run has not finished."""
    path = run_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MixlabError(f"{path} is not valid JSON ({exc}); re-run or delete that run.") from None
    if not isinstance(data, dict):
        raise MixlabError(f"{path} does not hold a JSON object.")
    return data


# ---------------------------------------------------------------------------------------------
# Extra steps: the training steps of the runs a run reads

INPUTS = "input_runs"
"""The summary.json block that records the runs a run read and the steps counted for them."""


def input_runs(config: dict[str, Any]) -> dict[str, str]:
    """The finished runs a run reads, by config key: DoReMi's reference model
    (``mixer.reference``) and Aioli's ``mixer.options.prior_run``."""
    mixer = config.get("mixer") or {}
    found = {
        "mixer.reference": mixer.get("reference"),
        "mixer.options.prior_run": (mixer.get("options") or {}).get("prior_run"),
    }
    return {k: str(v) for k, v in found.items() if v}


def own_extra_steps(summary: dict[str, Any]) -> int:
    """The extra steps the trainer counted itself (Skill-It's branches; a ``mixlab doremi``
    or ``mixlab sweep --final`` rewrite already includes the proxies), before the input runs
    were added."""
    block = summary.get(INPUTS)
    if isinstance(block, dict) and "own_extra_steps" in block:
        return int(block["own_extra_steps"])
    return int(summary.get("extra_steps") or 0)


def counted_steps(summary: dict[str, Any]) -> int:
    """Every training step behind a finished run: its own steps plus its extra steps."""
    return int(summary.get("steps") or 0) + int(summary.get("extra_steps") or 0)


def run_steps(run_dir: Path, _seen: frozenset[Path] = frozenset()) -> int | None:
    """Every training step behind the finished run in ``run_dir`` (``counted_steps`` of its
    summary, the input runs counted as ``with_input_steps`` does), or None when it has not
    finished."""
    summary = read_summary(run_dir)
    if summary is None:
        return None
    extra = summary_extra_steps(summary, read_config(run_dir), _seen | {run_dir.resolve()})
    return int(summary.get("steps") or 0) + extra


def with_input_steps(
    summary: dict[str, Any], config: dict[str, Any], _seen: frozenset[Path] = frozenset()
) -> dict[str, Any]:
    """``summary`` with the steps of the runs it read added to ``extra_steps`` (pure; I/O is
    only reading those runs' summary.json).

    The reference model of DoReMi and the prior run of Aioli are trained outside the run, but
    the method needs them, so their steps (with their own extra steps: the count is recursive)
    are the method's extra compute (docs/architecture.md, summary.json). The breakdown goes in
    an ``input_runs`` block, ``{"own_extra_steps": k, "runs": {key: {"run": dir, "steps":
    n}}}`` (the trainer's own count is kept there). A summary that has the block is returned
    unchanged: the count is made once, when the run finishes, and stays true if an input run
    is deleted later. A summary with no input run is returned unchanged too (no block).
    """
    if INPUTS in summary:
        return summary
    runs: dict[str, dict[str, Any]] = {}
    for key, path in input_runs(config).items():
        run_dir = Path(path)
        if not run_dir.is_dir() or run_dir.resolve() in _seen:  # a cycle counts nothing twice
            continue
        steps = run_steps(run_dir, _seen)
        if steps is not None:
            runs[key] = {"run": path, "steps": steps}
    if not runs:
        return summary
    own = own_extra_steps(summary)
    return {
        **summary,
        "extra_steps": own + sum(r["steps"] for r in runs.values()),
        INPUTS: {"own_extra_steps": own, "runs": runs},
    }


def summary_extra_steps(
    summary: dict[str, Any], config: dict[str, Any], _seen: frozenset[Path] = frozenset()
) -> int:
    """The extra steps of a finished run, as its summary.json counts them; a summary written
    without the input-run count (an older mixlab, or ``mixlab.train.loop.train`` called
    directly) gets it from ``with_input_steps``, the one definition."""
    return int(with_input_steps(summary, config, _seen).get("extra_steps") or 0)


def account_input_steps(run_dir: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``run_dir/summary.json`` (atomically, only when it changes) with the input
    runs' steps counted (``with_input_steps``); returns the summary."""
    from mixlab.data.format import write_json_atomic

    path = Path(run_dir)
    summary = read_summary(path)
    if summary is None:
        raise MixlabError(f"{path / SUMMARY} does not exist: the run has not finished.")
    updated = with_input_steps(summary, config)
    if updated != summary:
        write_json_atomic(path / SUMMARY, updated)
    return updated


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.toml as a plain dict (empty when absent)."""
    from mixlab.config import load_toml

    path = run_dir / CONFIG
    return load_toml(path) if path.is_file() else {}


def load_run(run_dir: str | Path) -> Run:
    """Read one run dir (finished or not)."""
    path = Path(run_dir)
    train, evals = read_metrics(path / METRICS)
    return Run(
        path=path,
        summary=read_summary(path),
        train=train,
        evals=evals,
        config=read_config(path),
    )


def is_run_dir(path: Path) -> bool:
    return (path / METRICS).is_file() or (path / SUMMARY).is_file()


def is_compare_dir(path: Path) -> bool:
    return (path / RUNS).is_dir() and not is_run_dir(path)


def compare_run_dirs(compare_dir: Path) -> list[Path]:
    """Run dirs of a compare dir: ``runs/<mixer>/seed<k>``, mixers in name order, seeds in
    numeric order (so the report is stable whichever run finished first)."""
    found: list[Path] = []
    root = compare_dir / RUNS
    for mixer_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = [
            (int(m.group(1)), p)
            for p in mixer_dir.iterdir()
            if p.is_dir() and (m := _SEED_DIR.match(p.name))
        ]
        found.extend(p for _, p in sorted(seeds) if is_run_dir(p))
    return found


def collect_runs(paths: list[str | Path]) -> list[Run]:
    """Expand every path (a run dir or a compare dir) into runs, with unique labels.

    A label is the mixer name. When two runs share mixer and seed (the same mixer from two
    places), every run of that mixer gets its source appended (the compare dir's or the run
    dir's name), so two configs of one mixer stay apart in tables and plots.
    """
    runs: list[Run] = []
    sources: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise MixlabError(f"'{path}' is not a directory (expected a run dir or a compare dir).")
        if is_run_dir(path):
            runs.append(load_run(path))
            sources.append(path.resolve().name)
        elif is_compare_dir(path):
            found = [load_run(p) for p in compare_run_dirs(path)]
            runs.extend(found)
            sources.extend([path.resolve().name] * len(found))
        else:
            raise MixlabError(
                f"'{path}' is neither a run dir (no {METRICS} or {SUMMARY}) nor a compare dir "
                f"(no {RUNS}/ folder)."
            )
    if not runs:
        raise MixlabError("no run found in " + ", ".join(str(p) for p in paths) + ".")
    _assign_labels(runs, sources)
    return runs


def _assign_labels(runs: list[Run], sources: list[str]) -> None:
    counts: dict[tuple[str, int], int] = {}
    for run in runs:
        counts[(run.mixer, run.seed)] = counts.get((run.mixer, run.seed), 0) + 1
    clashing = {mixer for (mixer, _), n in counts.items() if n > 1}
    for run, source in zip(runs, sources):
        run.label = f"{run.mixer} ({source})" if run.mixer in clashing else run.mixer
    keys = [(r.label, r.seed) for r in runs]
    for run in runs:
        if keys.count((run.label, run.seed)) > 1:
            # Same mixer, seed and source name in different places: the full path tells them apart.
            run.label = f"{run.mixer} ({run.path})"
