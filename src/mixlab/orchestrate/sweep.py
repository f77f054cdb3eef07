"""``mixlab sweep``: proxy runs on many mixtures, then the best mixture.

Trains N short proxy runs, each on a fixed mixture (``mixlab.offline.sweep``: Dirichlet draws
around a prior, or a simplex grid), records every run's per-domain validation and test losses,
and turns them into one weight vector three ways (``mixlab.orchestrate.sweep_fit``):

- ``dml``: the data mixing law fitted per domain, minimised on the simplex
  (``mixlab.offline.mixlaw``; needs N >= m + 2);
- ``regmix``: a regressor from mixture to objective, best predicted mixture
  (``mixlab.offline.regmix``; needs N >= 3);
- ``best``: the sampled mixture with the lowest observed objective (grid/random search).

The objective is the average validation loss over domains (``--objective avg``), one domain's
(``--objective DOMAIN``) or the target set's (``--objective target``, when the config has one).
Test losses are recorded, never used for the choice.

Layout of a sweep dir (the runs as ``mixlab compare`` lays them out, so ``mixlab report`` reads
them)::

    DIR/configs/mixNNN.toml       each proxy run's resolved config
    DIR/runs/mixNNN/seed<k>/      the proxy runs (``mixlab train``); all share train.seed
    DIR/logs/mixNNN-seed<k>.log
    DIR/sweep.json, sweep.csv     every run's mixture and losses, and the total steps
    DIR/mixture.json              each method's weights and fit quality, the chosen weights,
                                  ``extra_steps`` (the proxy runs' steps) and --set lines
    DIR/runs/final/seed<k>/       with --final: the config's run on the chosen mixture

Reuse: a proxy run whose dir holds ``summary.json`` and whose config matches is reused, one
with a checkpoint resumed (``mixlab.orchestrate.spec.run_state``); mixtures are prefix-stable, so
``--n`` can grow. Accounting: the final run's ``summary.json`` is rewritten once, atomically,
with ``extra_steps`` += the proxy runs' steps and a ``sweep`` block (``final_own_extra_steps``
keeps the trainer's count, so the rewrite is idempotent); ``mixlab compare`` tables read it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.config import apply_overrides, load_toml, to_dict
from mixlab.errors import ConfigError, MixlabError
from mixlab.orchestrate.launch import Launcher
from mixlab.orchestrate.scheduler import Progress
from mixlab.orchestrate.spec import RunSpec, write_configs
from mixlab.orchestrate.sweep_fit import SweepTable, choose
from mixlab.report.runs import SUMMARY

_NOT_TRAIN = ("compare", "mixers", "demo", "sweep")
"""Tables a compare or demo config may hold that a train config does not: ignored here."""


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class SweepPlan:
    """Everything a sweep will train, resolved and validated before anything runs."""

    out: Path
    domains: list[str]
    prior: np.ndarray
    """[m] the centre of the draws."""
    mixtures: np.ndarray
    """[n, m] one mixture per proxy run."""
    specs: list[RunSpec]
    """One run spec per proxy run (``mixlab compare``'s, so its scheduler runs them)."""
    base: dict[str, Any]
    """The config shared by every run, without --proxy-set (what a final run uses)."""
    options: dict[str, Any] = field(default_factory=dict)


def parse_prior(text: str, domains: list[str], train_tokens: np.ndarray) -> np.ndarray:
    """[m] the prior: 'uniform', 'natural' (∝ train tokens) or an inline table of weights."""
    from mixlab.config import parse_override
    from mixlab.mixers._util import weights_from_mapping

    if text == "uniform":
        return np.full(len(domains), 1.0 / len(domains))
    if text == "natural":
        return train_tokens / train_tokens.sum()
    _, value = parse_override(f"prior={text}")
    if not isinstance(value, dict):
        raise ConfigError(f"--prior must be uniform, natural or a table like '{{a = 0.5, b = 0.5}}', got {text!r}.")
    return weights_from_mapping(value, domains, "--prior")


def fixed_mixer(domains: list[str], weights: np.ndarray) -> dict[str, Any]:
    """The ``[mixer]`` table of a run on a fixed mixture."""
    return {"name": "fixed", "options": {"weights": dict(zip(domains, map(float, weights)))}}


def plan_sweep(
    config_path: str | Path | None,
    out: str | Path,
    n: int,
    overrides: list[str] | None = None,
    proxy_overrides: list[str] | None = None,
    mode: str = "dirichlet",
    prior: str = "uniform",
    concentration: float = 1.0,
    resolution: int = 0,
    seed: int | None = None,
    raw: dict[str, Any] | None = None,
) -> SweepPlan:
    """Resolve one train config per proxy run (all validated); nothing is written."""
    from mixlab.config import from_dict
    from mixlab.data.format import DataDir
    from mixlab.offline.sweep import sweep_mixtures
    from mixlab.train.config import TrainConfig

    data = dict(raw) if raw is not None else (load_toml(config_path) if config_path else {})
    for key in _NOT_TRAIN:
        data.pop(key, None)
    data = apply_overrides(data, overrides or [])
    data.pop("mixer", None)
    table = dict(data.get("data", {}))
    table["dir"] = str(Path(table.get("dir", "data/builtin")).expanduser().resolve())
    data["data"] = table
    base = to_dict(from_dict(TrainConfig, data))
    dd = DataDir.open(base["data"]["dir"])
    domains = list(base["data"].get("domains") or dd.domains)
    tokens = np.array([dd.manifest.domain(d).splits["train"].tokens for d in domains], np.float64)
    p0 = parse_prior(prior, domains, tokens)
    train_seed = int(base["train"].get("seed", 0))
    mix_seed = train_seed if seed is None else seed
    mixtures = sweep_mixtures(n, p0, mode, concentration, mix_seed, resolution)
    out = Path(out).resolve()
    proxy = apply_overrides(data, proxy_overrides or [])
    specs = []
    for i, w in enumerate(mixtures):
        cfg = from_dict(TrainConfig, {**proxy, "mixer": fixed_mixer(domains, w)})
        name = f"mix{i:03d}"
        specs.append(RunSpec(
            mixer=name, seed=train_seed, run_dir=out / "runs" / name / f"seed{train_seed}",
            config_path=out / "configs" / f"{name}.toml", config=to_dict(cfg),
            steps=cfg.train.steps,
        ))  # fmt: skip
    options = {"n": n, "mode": mode, "prior": prior, "concentration": concentration,
               "resolution": resolution, "seed": mix_seed}  # fmt: skip
    return SweepPlan(out=out, domains=domains, prior=p0, mixtures=mixtures, specs=specs,
                     base=base, options=options)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def collect(plan: SweepPlan) -> SweepTable:
    """The finished runs of the plan (unfinished ones are left out)."""
    names, mix, val, test, tgt, steps = [], [], [], [], [], 0
    for spec, w in zip(plan.specs, plan.mixtures):
        path = spec.run_dir / SUMMARY
        if not path.is_file():
            continue
        s = _read(path)
        names.append(spec.mixer)
        mix.append(w)
        val.append([float(s["val"]["loss"][d]) for d in plan.domains])
        test.append([float(s["test"]["loss"][d]) for d in plan.domains])
        tgt.append(s["val"].get("target_loss"))
        steps += int(s.get("steps") or 0) + int(s.get("extra_steps") or 0)
    m = len(plan.domains)
    has_target = bool(tgt) and all(t is not None for t in tgt)
    return SweepTable(
        names=names,
        mixtures=np.asarray(mix, dtype=np.float64).reshape(-1, m),
        val=np.asarray(val, dtype=np.float64).reshape(-1, m),
        test=np.asarray(test, dtype=np.float64).reshape(-1, m),
        target=np.asarray(tgt, dtype=np.float64) if has_target else None,
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def sweep_json(plan: SweepPlan, table: SweepTable) -> dict[str, Any]:
    rows = []
    for i, name in enumerate(table.names):
        rows.append({
            "name": name,
            "dir": str(plan.out / "runs" / name / f"seed{plan.specs[0].seed}"),
            "weights": dict(zip(plan.domains, map(float, table.mixtures[i]))),
            "val_loss": dict(zip(plan.domains, map(float, table.val[i]))),
            "test_loss": dict(zip(plan.domains, map(float, table.test[i]))),
            "val_target_loss": None if table.target is None else float(table.target[i]),
        })  # fmt: skip
    return {"domains": plan.domains, "options": plan.options, "prior": plan.prior.tolist(),
            "planned_runs": len(plan.specs), "finished_runs": len(table.names),
            "total_steps": table.steps, "runs": rows}  # fmt: skip


def sweep_csv(plan: SweepPlan, table: SweepTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", *[f"w_{d}" for d in plan.domains], *[f"val_{d}" for d in plan.domains],
                "val_avg", *[f"test_{d}" for d in plan.domains], "test_avg"])  # fmt: skip
    for i, name in enumerate(table.names):
        w.writerow([name, *map(repr, table.mixtures[i].tolist()), *map(repr, table.val[i].tolist()),
                    repr(float(table.val[i].mean())), *map(repr, table.test[i].tolist()),
                    repr(float(table.test[i].mean()))])  # fmt: skip
    return buf.getvalue()


def write_outputs(plan: SweepPlan, table: SweepTable, result: dict[str, Any] | None) -> None:
    from mixlab.data.format import write_json_atomic

    write_json_atomic(plan.out / "sweep.json", sweep_json(plan, table))
    tmp = plan.out / ".sweep.csv.tmp"
    tmp.write_text(sweep_csv(plan, table), encoding="utf-8")
    tmp.replace(plan.out / "sweep.csv")
    if result is not None:
        write_json_atomic(plan.out / "mixture.json", result)


# ---------------------------------------------------------------------------------------------
# The final run and its accounting


def final_spec(plan: SweepPlan, weights: dict[str, float]) -> RunSpec:
    from mixlab.config import from_dict
    from mixlab.train.config import TrainConfig

    cfg = from_dict(TrainConfig, {**plan.base, "mixer": fixed_mixer(plan.domains, np.array(
        [weights[d] for d in plan.domains]))})  # fmt: skip
    seed = cfg.train.seed
    return RunSpec(mixer="final", seed=seed, run_dir=plan.out / "runs" / "final" / f"seed{seed}",
                   config_path=plan.out / "configs" / "final.toml", config=to_dict(cfg),
                   steps=cfg.train.steps)  # fmt: skip


def account_final(run_dir: Path, result: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    """Rewrite the final run's summary.json with the proxy steps added to extra_steps (once)."""
    from mixlab.data.format import write_json_atomic

    s = _read(run_dir / SUMMARY)
    block = s.get("sweep")
    own = int(block["final_own_extra_steps"]) if isinstance(block, dict) else int(s.get("extra_steps") or 0)
    updated = {**s, "extra_steps": own + int(result["extra_steps"]),
               "sweep": {"dir": str(sweep_dir), "method": result["method"],
                         "objective": result["objective"], "proxy_runs": result["runs"],
                         "proxy_steps": int(result["extra_steps"]),
                         "final_own_extra_steps": own}}  # fmt: skip
    if updated != s:
        write_json_atomic(run_dir / SUMMARY, updated)
    return updated


def sweep(
    plan: SweepPlan,
    method: str = "dml",
    objective: str = "avg",
    regressor: str = "gbr",
    floor: float = 0.0,
    candidates: int = 100_000,
    final: bool = False,
    jobs: int | None = None,
    launcher: Launcher | None = None,
    progress: Progress | None = None,
    force: bool = False,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Train (or reuse) the proxy runs, write sweep.json/csv and mixture.json; return the
    mixture result (with ``final``: also the final run's summary under "final")."""
    from mixlab.orchestrate.launch import subprocess_launcher
    from mixlab.orchestrate.scheduler import run_all

    launcher = launcher or subprocess_launcher
    progress = progress or Progress(enabled=False)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_configs(plan.specs)
    outcome = run_all(plan.specs, jobs=jobs, launcher=launcher, progress=progress,
                      poll_s=poll_s, force=force)  # fmt: skip
    table = collect(plan)
    try:
        result = choose(table, plan.domains, method, objective, regressor, floor, plan.prior,
                        int(plan.options.get("seed", 0)), candidates)  # fmt: skip
    except MixlabError:
        write_outputs(plan, table, None)
        raise
    failed = [k for k, v in outcome.items() if v in ("failed", "skipped")]
    if failed:
        result["notes"].append(f"{len(failed)} proxy run(s) did not finish: {', '.join(failed)}")
    write_outputs(plan, table, result)
    result["outcome"] = outcome
    if final:
        spec = final_spec(plan, result["weights"])
        write_configs([spec])
        out = run_all([spec], jobs=1, launcher=launcher, progress=progress, poll_s=poll_s, force=force)
        if out[spec.key] in ("failed", "skipped"):
            raise MixlabError(f"the final run {spec.run_dir} did not finish; see {plan.out / 'logs'}.")
        result["final"] = account_final(spec.run_dir, result, plan.out)
    return result


