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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.config import apply_overrides, from_dict, load_toml, to_dict
from mixlab.errors import ConfigError
from mixlab.orchestrate.launch import Launcher, subprocess_launcher
from mixlab.orchestrate.scheduler import Outcome, Progress, run_all
from mixlab.orchestrate.spec import RunSpec, write_configs
from mixlab.report.runs import PLAN_FILE, SUMMARY, load_run
from mixlab.report.table import DEFAULT_BASELINE, Comparison, build_comparison, to_csv, to_markdown


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
class ComparePlan:
    """A comparison resolved and validated: its methods, seeds, baseline and one spec per run."""

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
    (plan.out / "configs").mkdir(parents=True, exist_ok=True)
    write_configs(plan.specs)
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
