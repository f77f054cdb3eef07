"""``mixlab compare``: train every (method, seed) on the same data, model, budget and evaluation.

Layout of a compare dir::

    DIR/compare.json                 the plan: methods, seeds, baseline, run dirs
    DIR/configs/<mixer>-seed<k>.toml the resolved config of each run (``mixlab train`` input)
    DIR/runs/<mixer>/seed<k>/        the run dirs (written by ``mixlab train``)
    DIR/logs/<mixer>-seed<k>.log     each run's stdout and stderr
    DIR/comparison.md, .csv          the table (``mixlab.report.table``)

The compare config is a ``mixlab train`` config plus tables that ``train`` never sees:
``[compare]`` (``CompareConfig``: methods, seeds, baseline) and ``[mixers.<name>]``, the
``[mixer]`` table of method ``<name>``'s runs (``apply``, ``reference``, ``[mixers.<name>.options]``;
the name is implied). Fields of a shared ``[mixer]`` table apply to every method, except its
options, which belong to the method it names; ``[mixers.<name>]`` goes on top. ``reference`` may
name another compared method: the run of that method with the same seed is then the reference
model, and is trained first. ``--set`` overrides apply to the whole file first, so
``--set mixers.aioli.options.eta=0.5`` works.

Each run is a subprocess ``python -m mixlab train CONFIG --out RUN_DIR --set train.threads=T
--set train.progress=false [--resume]``. Runs go in parallel, J = min(jobs, cores) at a time
with T = max(1, cores // J) torch threads each; a ``train.threads`` set in the config or with
``--set`` is kept as T (and J then defaults to cores // T). A run whose ``summary.json`` exists and whose
config matches is reused; a run with a checkpoint is resumed. A mixer that needs a reference
model (class attribute ``needs_reference = True``) and has none configured follows DoReMi's
recipe: its reference is the stratified run of the same seed (stratified is added to the
comparison when it is not already there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from mixlab.cli import MALLOC_ENV
from mixlab.config import apply_overrides, from_dict, load_toml, to_dict
from mixlab.errors import ConfigError, MixlabError
from mixlab.report.runs import CONFIG, METRICS, SUMMARY, load_run
from mixlab.report.table import DEFAULT_BASELINE, Comparison, build_comparison, to_csv, to_markdown

PLAN_FILE = "compare.json"


@dataclass
class CompareConfig:
    """The ``[compare]`` table of a compare config (the CLI's --mixers and --seeds override it)."""

    mixers: list[str] = field(default_factory=list)
    """Methods to compare, by registry name (``mixlab train --list-mixers``)."""
    seeds: int = 1
    """Seeds per method: train.seed, train.seed + 1, ... Every method runs every seed."""
    baseline: str = ""
    """Method the paired differences are taken from; empty = stratified if compared, else the
    first method."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"compare.seeds must be >= 1, got {self.seeds}.")
        dup = sorted({m for m in self.mixers if self.mixers.count(m) > 1})
        if dup:
            raise ConfigError(f"compare.mixers lists {', '.join(dup)} more than once.")
        if self.baseline and self.mixers and self.baseline not in self.mixers:
            raise ConfigError(
                f"compare.baseline '{self.baseline}' is not among the mixers {self.mixers}."
            )


@dataclass
class RunSpec:
    """One run of a comparison."""

    mixer: str
    seed: int
    run_dir: Path
    config_path: Path
    config: dict[str, Any]
    """The run's resolved config (what ``config_path`` holds)."""
    steps: int
    needs: list[str] = field(default_factory=list)
    """Keys of runs that must finish first (a reference model)."""

    @property
    def key(self) -> str:
        return f"{self.mixer}/seed{self.seed}"


@dataclass
class ComparePlan:
    out: Path
    mixers: list[str]
    seeds: list[int]
    baseline: str
    specs: list[RunSpec]
    notes: list[str] = field(default_factory=list)
    """Things the user should know about the plan (printed before running)."""


# ---------------------------------------------------------------------------------------------
# Planning


def plan_compare(
    config_path: str | Path | None,
    out: str | Path,
    overrides: list[str] | None = None,
    mixers: list[str] | None = None,
    seeds: int | None = None,
    raw: dict[str, Any] | None = None,
) -> ComparePlan:
    """Read the compare config (or take ``raw``), resolve one train config per run, validate all.

    Nothing is written; every config error surfaces here, before any run starts.
    """
    from mixlab.mixers.base import MIXERS, mixer_class
    from mixlab.train.config import TrainConfig

    data = dict(raw) if raw is not None else (load_toml(config_path) if config_path else {})
    data = apply_overrides(data, overrides or [])
    cmp_table = data.pop("compare", {})
    per_mixer = data.pop("mixers", {})
    if not isinstance(cmp_table, dict) or not isinstance(per_mixer, dict):
        raise ConfigError("[compare] and [mixers] must be tables.")
    cc = from_dict(CompareConfig, cmp_table, "compare")
    if mixers:
        cc = dataclasses.replace(cc, mixers=list(mixers))
    if seeds is not None:
        cc = dataclasses.replace(cc, seeds=seeds)
    if not cc.mixers:
        raise ConfigError("no method to compare: pass --mixers a,b,... or set compare.mixers.")
    for name in per_mixer:
        # Options of methods left out of this comparison are kept for another, but a name
        # that is no method at all is a typo.
        mixer_class(name)
    base_mixer = data.get("mixer", {})
    if not isinstance(base_mixer, dict):
        raise ConfigError("[mixer] must be a table.")
    tables = {name: _mixer_table(name, base_mixer, per_mixer.get(name, {})) for name in cc.mixers}

    notes: list[str] = []
    order = list(cc.mixers)
    auto_ref = [n for n, t in tables.items() if not t.get("reference") and _needs_reference(n)]
    for name in auto_ref:
        tables[name]["reference"] = DEFAULT_BASELINE
    if auto_ref and DEFAULT_BASELINE not in order:
        order.append(DEFAULT_BASELINE)
        tables[DEFAULT_BASELINE] = _mixer_table(DEFAULT_BASELINE, base_mixer, {})
        notes.append(
            f"{', '.join(auto_ref)} need(s) a reference model: adding {DEFAULT_BASELINE}, whose "
            "run of each seed serves as the reference."
        )
    if DEFAULT_BASELINE in order:
        # The baseline goes first: row one of the table, and the usual reference model.
        order.remove(DEFAULT_BASELINE)
        order.insert(0, DEFAULT_BASELINE)

    data_table = dict(data.get("data", {}))
    data_table["dir"] = str(Path(data_table.get("dir", "data/builtin")).expanduser().resolve())
    data["data"] = data_table
    base_seed = int(data.get("train", {}).get("seed", 0))
    seed_list = [base_seed + k for k in range(cc.seeds)]
    out = Path(out).resolve()

    specs: list[RunSpec] = []
    for name in order:
        table = tables[name]
        ref = str(table.get("reference", ""))
        if ref == name:
            raise ConfigError(f"mixers.{name}.reference names {name} itself.")
        for seed in seed_list:
            mixer_table = dict(table)
            needs: list[str] = []
            if ref in order:
                # A compared method as the reference: its run of the same seed, trained first.
                mixer_table["reference"] = str(_run_dir(out, ref, seed))
                needs.append(f"{ref}/seed{seed}")
            elif ref in MIXERS:
                raise ConfigError(
                    f"mixers.{name}.reference = '{ref}' is a method that is not compared: add it "
                    "to the mixers, or give a finished run dir."
                )
            elif ref:
                mixer_table["reference"] = str(Path(ref).expanduser().resolve())
            run_data = {
                **data,
                "mixer": mixer_table,
                "train": {**data.get("train", {}), "seed": seed},
            }
            cfg = from_dict(TrainConfig, run_data)
            specs.append(
                RunSpec(
                    mixer=name,
                    seed=seed,
                    run_dir=_run_dir(out, name, seed),
                    config_path=out / "configs" / f"{name}-seed{seed}.toml",
                    config=to_dict(cfg),
                    steps=cfg.train.steps,
                    needs=needs,
                )
            )
    baseline = cc.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in order else order[0])
    return ComparePlan(
        out=out, mixers=order, seeds=seed_list, baseline=baseline, specs=specs, notes=notes
    )


def _needs_reference(name: str) -> bool:
    from mixlab.mixers.base import mixer_class

    return bool(getattr(mixer_class(name), "needs_reference", False))


def _mixer_table(name: str, base: dict[str, Any], own: Any) -> dict[str, Any]:
    """The ``[mixer]`` table of method ``name``'s runs: the shared ``[mixer]`` fields (its
    options only when it names this method), then ``[mixers.<name>]`` on top; validated."""
    from mixlab.mixers.base import mixer_class
    from mixlab.train.config import MixerConfig

    where = f"mixers.{name}"
    if not isinstance(own, dict):
        raise ConfigError(f"[{where}] must be a table (apply, reference, options).")
    if "name" in own:
        raise ConfigError(f"{where}.name is implied by the table's name; remove it.")
    cls = mixer_class(name)
    option_names = {f.name for f in dataclasses.fields(cls.Config)}
    table_fields = {f.name for f in dataclasses.fields(MixerConfig)}
    misplaced = sorted(set(own) & (option_names - table_fields))
    if misplaced:
        raise ConfigError(
            f"{where}.{misplaced[0]} is an option of {name}: put it under [{where}.options]."
        )
    table = {k: v for k, v in base.items() if k not in ("name", "options")}
    options = dict(base.get("options", {})) if base.get("name") == name else {}
    options.update(own.get("options", {}))
    table.update({k: v for k, v in own.items() if k != "options"})
    table.update(name=name, options=options)
    from_dict(cls.Config, options, where=f"{where}.options")
    from_dict(MixerConfig, table, where=where)
    return table


def _run_dir(out: Path, mixer: str, seed: int) -> Path:
    return out / "runs" / mixer / f"seed{seed}"


def write_plan(plan: ComparePlan) -> None:
    """Write the per-run configs and compare.json (what ``mixlab report`` reads back)."""
    import tomli_w

    (plan.out / "configs").mkdir(parents=True, exist_ok=True)
    for spec in plan.specs:
        spec.config_path.write_text(tomli_w.dumps(spec.config), encoding="utf-8")
    manifest = {
        "mixers": plan.mixers,
        "seeds": plan.seeds,
        "baseline": plan.baseline,
        "runs": [
            {"mixer": s.mixer, "seed": s.seed, "dir": str(s.run_dir.relative_to(plan.out))}
            for s in plan.specs
        ],
    }
    (plan.out / PLAN_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# What is on disk already


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


# ---------------------------------------------------------------------------------------------
# Launching


class Process(Protocol):
    """The part of ``subprocess.Popen`` the scheduler uses (tests inject fakes)."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


Launcher = Callable[[RunSpec, bool, int], Process]
"""(spec, resume, threads) -> a started process."""


def train_command(spec: RunSpec, resume: bool, threads: int) -> list[str]:
    """The ``mixlab train`` command line of one run."""
    cmd = [
        sys.executable, "-m", "mixlab", "train", str(spec.config_path),
        "--out", str(spec.run_dir),
        "--set", f"train.threads={threads}",
        "--set", "train.progress=false",
    ]  # fmt: skip
    if resume:
        cmd.append("--resume")
    return cmd


def log_path(spec: RunSpec) -> Path:
    return spec.run_dir.parents[2] / "logs" / f"{spec.mixer}-seed{spec.seed}.log"


def subprocess_launcher(spec: RunSpec, resume: bool, threads: int) -> Process:
    """Start ``mixlab train`` for one run, its output appended to DIR/logs/<run>.log."""
    log = log_path(spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **MALLOC_ENV,
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = train_command(spec, resume, threads)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        # A session of its own: Ctrl-C reaches only compare, which forwards one SIGINT to each
        # run, so a run is never hit twice while it writes its interrupt checkpoint.
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def parallelism(
    jobs: int | None, n_runs: int, cores: int | None = None, threads: int = 0
) -> tuple[int, int]:
    """(J, T): processes at once and torch threads each.

    ``threads`` is the runs' ``train.threads``: 0 (its default, "torch's default") lets compare
    choose T = max(1, cores // J) with J = min(jobs, cores, runs to do); a value the user set
    (config or --set) is kept as T, and then J defaults to max(1, cores // T), so that J x T
    does not exceed the cores unless ``jobs`` asks for more.
    """
    cores = cores or available_cores()
    todo = max(1, n_runs)
    if threads > 0:
        return max(1, min(jobs or max(1, cores // threads), cores, todo)), threads
    j = max(1, min(jobs or cores, cores, todo))
    return j, max(1, cores // j)


def requested_threads(spec: RunSpec) -> int:
    """The run's ``train.threads`` as its config sets it; 0 = not set (compare chooses)."""
    return int((spec.config.get("train") or {}).get("threads") or 0)


# ---------------------------------------------------------------------------------------------
# Progress


class StepTail:
    """The latest ``step`` written to a run's metrics.jsonl, read incrementally."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.step = 0
        self._partial = ""

    def poll(self) -> int:
        try:
            with self.path.open(encoding="utf-8") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except FileNotFoundError:
            return self.step
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # a line still being written
        for raw in lines:
            try:
                step = json.loads(raw).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(step, int):
                self.step = max(self.step, step)
        return self.step


class Progress:
    """Status of a comparison on a stream: one line per event, and a status line that is
    redrawn in place on a terminal, or printed every ``every_s`` seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 15.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.enabled = enabled
        self._last = 0.0
        self._drawn = False
        self.start = time.monotonic()

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(f"[compare] {text}", file=self.stream, flush=True)

    def status(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()
            self._drawn = True
        elif force or now - self._last >= self.every_s:
            print(text, file=self.stream, flush=True)
            self._last = now

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


def _fmt_time(seconds: float) -> str:
    secs = round(seconds)
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


# ---------------------------------------------------------------------------------------------
# Scheduling


Outcome = Literal["reused", "finished", "failed", "skipped"]


@dataclass
class _Running:
    spec: RunSpec
    proc: Process
    tail: StepTail
    started: float


def run_all(
    specs: list[RunSpec],
    jobs: int | None = None,
    launcher: Launcher = subprocess_launcher,
    progress: Progress | None = None,
    poll_s: float = 1.0,
    force: bool = False,
    cores: int | None = None,
) -> dict[str, Outcome]:
    """Run every spec not already done, at most J at a time, respecting ``needs``.

    Returns each run's outcome. A failed run does not stop the others; runs that need it are
    skipped. On Ctrl-C (or SIGTERM) each live run gets one SIGINT, so it stops at the next step
    with a checkpoint, and the same command resumes it later.
    """
    progress = progress or Progress(enabled=False)
    states = {s.key: run_state(s, force) for s in specs}
    outcome: dict[str, Outcome] = {k: "reused" for k, st in states.items() if st == "done"}
    todo = [s for s in specs if states[s.key] != "done"]
    if outcome:
        progress.event(f"reusing {len(outcome)} finished run(s): {', '.join(outcome)}")
    # A train.threads the user set wins over compare's choice (every run shares the [train]
    # table, so one value; the largest is taken should they ever differ).
    user_threads = max((requested_threads(s) for s in todo), default=0)
    j, threads = parallelism(jobs, len(todo), cores, threads=user_threads)
    if todo:
        how = " (train.threads of the config)" if user_threads else ""
        progress.event(
            f"{len(todo)} run(s) to train, {j} at a time with {threads} thread(s) each{how}"
        )
        n_cores = cores or available_cores()
        if j > 1 and j * threads > n_cores:
            progress.event(
                f"note: {j} x {threads} threads exceed the {n_cores} cores; runs will slow each "
                "other down (lower --jobs or train.threads)"
            )
    total_steps = sum(s.steps for s in todo)
    done_steps = 0
    pending = list(todo)
    running: dict[str, _Running] = {}

    with _sigterm_as_interrupt():
        try:
            while pending or running:
                for spec in list(pending):
                    bad = [n for n in spec.needs if outcome.get(n) in ("failed", "skipped")]
                    if bad:
                        pending.remove(spec)
                        outcome[spec.key] = "skipped"
                        progress.event(f"skipped {spec.key}: {', '.join(bad)} did not finish")
                for spec in list(pending):
                    if len(running) >= j:
                        break
                    if any(outcome.get(n) not in ("reused", "finished") for n in spec.needs):
                        continue
                    pending.remove(spec)
                    resume = states[spec.key] == "resume"
                    proc = launcher(spec, resume, requested_threads(spec) or threads)
                    running[spec.key] = _Running(
                        spec, proc, StepTail(spec.run_dir / METRICS), time.monotonic()
                    )
                    progress.event(f"{'resumed' if resume else 'started'} {spec.key}")
                for key, r in list(running.items()):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    del running[key]
                    done_steps += r.spec.steps
                    took = _fmt_time(time.monotonic() - r.started)
                    if rc == 0 and (r.spec.run_dir / SUMMARY).is_file():
                        outcome[key] = "finished"
                        progress.event(f"finished {key} in {took}{_result_text(r.spec)}")
                    else:
                        outcome[key] = "failed"
                        progress.event(
                            f"FAILED {key} (exit {rc}) after {took}; see {log_path(r.spec)}"
                            + _log_tail(log_path(r.spec))
                        )
                live = sum(r.tail.poll() for r in running.values())
                progress.status(
                    _status_line(specs, outcome, running, done_steps + live, total_steps, progress)
                )
                if pending or running:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            progress.close()
            _stop(running, progress)
            raise
    progress.close()
    return outcome


def _status_line(
    specs: list[RunSpec],
    outcome: dict[str, Outcome],
    running: dict[str, _Running],
    steps: int,
    total_steps: int,
    progress: Progress,
) -> str:
    elapsed = time.monotonic() - progress.start
    bad = sum(1 for v in outcome.values() if v in ("failed", "skipped"))
    parts = [f"[compare] {len(outcome) - bad}/{len(specs)} runs done"
             + (f" ({bad} failed or skipped)" if bad else "")]  # fmt: skip
    if running:
        parts.append(
            "running: " + ", ".join(f"{k} {r.tail.step}/{r.spec.steps}" for k, r in running.items())
        )
    parts.append(f"elapsed {_fmt_time(elapsed)}")
    if 0 < steps < total_steps:
        parts.append(f"ETA ~{_fmt_time(elapsed * (total_steps - steps) / steps)}")
    return " · ".join(parts)


def _result_text(spec: RunSpec) -> str:
    try:
        summary = json.loads((spec.run_dir / SUMMARY).read_text(encoding="utf-8"))
        return f": avg test PPL {float(summary['test']['avg_ppl']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line}" for line in tail)


def _stop(running: dict[str, _Running], progress: Progress, grace_s: float = 60.0) -> None:
    """Ask every live run to stop (one SIGINT: it checkpoints), then kill stragglers."""
    if not running:
        return
    progress.event(f"interrupted: stopping {len(running)} run(s) (they write a checkpoint)")
    for r in running.values():
        with suppress(ProcessLookupError):
            r.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for r in running.values():
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
    progress.event("stopped; run the same command again to resume")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the runs (in their own sessions) are stopped, not orphaned."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# The whole command


@dataclass
class CompareResult:
    plan: ComparePlan
    outcome: dict[str, Outcome]
    comparison: Comparison | None
    markdown: str

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.outcome.items() if v in ("failed", "skipped")]


def comparison_of(plan: ComparePlan) -> Comparison | None:
    """The table over the plan's finished runs (None when none has finished)."""
    runs = []
    for spec in plan.specs:
        if (spec.run_dir / SUMMARY).is_file():
            run = load_run(spec.run_dir)
            run.label = spec.mixer
            runs.append(run)
    if not runs:
        return None
    methods = {r.label for r in runs}
    baseline = plan.baseline if plan.baseline in methods else None
    return build_comparison(runs, baseline=baseline, order=plan.mixers)


def write_tables(plan: ComparePlan, title: str = "Comparison") -> tuple[Comparison | None, str]:
    """Write DIR/comparison.md and DIR/comparison.csv from the finished runs."""
    cmp = comparison_of(plan)
    if cmp is None:
        return None, ""
    markdown = to_markdown(cmp, title=title)
    (plan.out / "comparison.md").write_text(markdown, encoding="utf-8")
    (plan.out / "comparison.csv").write_text(to_csv(cmp), encoding="utf-8")
    return cmp, markdown


def compare(
    plan: ComparePlan,
    jobs: int | None = None,
    launcher: Launcher = subprocess_launcher,
    progress: Progress | None = None,
    force: bool = False,
    poll_s: float = 1.0,
    title: str = "Comparison",
) -> CompareResult:
    """Write the plan, run what is missing, and write the tables."""
    progress = progress or Progress()
    for note in plan.notes:
        progress.event(note)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_plan(plan)
    outcome = run_all(
        plan.specs, jobs=jobs, launcher=launcher, progress=progress, poll_s=poll_s, force=force
    )
    cmp, markdown = write_tables(plan, title=title)
    return CompareResult(plan=plan, outcome=outcome, comparison=cmp, markdown=markdown)
