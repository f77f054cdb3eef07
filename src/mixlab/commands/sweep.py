"""``mixlab sweep CONFIG --n N --out DIR``: proxy runs on many mixtures, then the best mixture.

Trains N short proxy runs, each on a fixed mixture (``mixlab.offline.sweep``: Dirichlet draws
around a prior, or a simplex grid), records every run's per-domain validation and test losses,
and turns them into one weight vector three ways:

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
with a checkpoint resumed (``mixlab.report.compare.run_state``); mixtures are prefix-stable, so
``--n`` can grow. Accounting: the final run's ``summary.json`` is rewritten once, atomically,
with ``extra_steps`` += the proxy runs' steps and a ``sweep`` block (``final_own_extra_steps``
keeps the trainer's count, so the rewrite is idempotent); ``mixlab compare`` tables read it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixlab.config import apply_overrides, load_toml, to_dict
from mixlab.errors import ConfigError, MixlabError

if TYPE_CHECKING:
    from mixlab.report.compare import Launcher, Progress, RunSpec

METHODS = ("dml", "regmix", "best")
SUMMARY = "summary.json"
_NOT_TRAIN = ("compare", "mixers", "demo", "sweep")
"""Tables a compare or demo config may hold that a train config does not: ignored here."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep",
        help="train proxy runs on many mixtures and fit the best mixture (DML, RegMix, best run)",
        description="Train N proxy runs on fixed mixtures (Dirichlet around a prior, or a "
        "simplex grid; seeded, prefix-stable), record their per-domain losses, fit the data "
        "mixing law and a RegMix regressor, and write the best mixture to DIR/mixture.json "
        "with the --set lines that use it. Finished runs are reused.",
    )
    p.add_argument("config", nargs="?", help="TOML train config (defaults for missing keys)")
    p.add_argument("--n", type=int, required=True, help="number of proxy runs (mixtures)")
    p.add_argument("--out", required=True, help="sweep dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run (repeatable)")
    p.add_argument("--proxy-set", dest="proxy_overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override a value for the proxy runs only, e.g. train.steps=100")
    p.add_argument("--mode", choices=["dirichlet", "grid"], default="dirichlet",
                   help="how mixtures are drawn (default: dirichlet)")
    p.add_argument("--prior", default="uniform",
                   help="centre of the draws: uniform, natural (train tokens) or "
                   "'{a = 0.5, b = 0.5}' (default: uniform)")
    p.add_argument("--concentration", type=float, default=1.0,
                   help="Dirichlet concentration per domain; larger = closer to the prior "
                   "(default: 1, uniform on the simplex for a uniform prior)")
    p.add_argument("--resolution", type=int, default=0,
                   help="grid resolution r (weights in multiples of 1/r); 0 = smallest holding N")
    p.add_argument("--seed", type=int, help="seed of the mixtures (default: train.seed)")
    p.add_argument("--method", choices=METHODS, default="dml",
                   help="whose weights are the output (default: dml); all are reported")
    p.add_argument("--objective", default="avg",
                   help="avg (mean validation loss over domains), a domain name, or target "
                   "(the target set's loss) (default: avg)")
    p.add_argument("--regressor", choices=["gbr", "linear"], default="gbr",
                   help="RegMix regressor (default: gbr, gradient boosting)")
    p.add_argument("--candidates", type=int, default=100_000,
                   help="RegMix: Dirichlet mixtures scored by the regressor; the mean of the "
                   "best 100 is its output (default: 100000)")
    p.add_argument("--floor", type=float, default=0.0,
                   help="minimum weight of every domain in the output (default: 0)")
    p.add_argument("--final", action="store_true",
                   help="also train DIR/runs/final: the config (without --proxy-set) on the chosen "
                   "mixture; its summary counts the proxy steps as extra_steps")
    p.add_argument("--jobs", type=int, help="runs at once (default: CPU cores)")
    p.add_argument("--force", action="store_true",
                   help="delete and redo runs in DIR made with a different config")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=run)


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
    from mixlab.report.compare import RunSpec
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


class _Finished:
    """A process that has already exited with ``rc`` (what ``inline_launcher`` returns)."""

    def __init__(self, rc: int):
        self.rc = rc

    def poll(self) -> int:
        return self.rc

    def wait(self, timeout: float | None = None) -> int:
        return self.rc

    def send_signal(self, sig: int) -> None:
        pass

    def kill(self) -> None:
        pass


def inline_launcher(spec: RunSpec, resume: bool, threads: int) -> _Finished:
    """Train one run in this process (blocking) instead of a subprocess: no start-up cost, one
    run at a time. For tests and the Python API; the CLI starts subprocesses."""
    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    train(load_config(spec.config_path), spec.run_dir, resume=resume)
    return _Finished(0)


def write_configs(plan: SweepPlan) -> None:
    import tomli_w

    (plan.out / "configs").mkdir(parents=True, exist_ok=True)
    for spec in plan.specs:
        spec.config_path.write_text(tomli_w.dumps(spec.config), encoding="utf-8")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class SweepTable:
    """The finished proxy runs' numbers (rows in sweep order)."""

    names: list[str]
    mixtures: np.ndarray
    """[R, m]"""
    val: np.ndarray
    """[R, m] per-domain validation loss (what the fits use)."""
    test: np.ndarray
    """[R, m] per-domain test loss (recorded, never used for the choice)."""
    target: np.ndarray | None
    """[R] validation loss on the target set, when the runs have one."""
    steps: int
    """Training steps of the finished proxy runs, extra steps included."""


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
# Choosing the mixture


def objective_of(table: SweepTable, domains: list[str], objective: str) -> tuple[np.ndarray, np.ndarray]:
    """(losses [R, k], weights [k]): the losses the objective is made of and their weights."""
    from mixlab.offline.mixlaw import objective_weights

    if objective == "target":
        if table.target is None:
            raise ConfigError("--objective target needs runs with a target set; set target.path "
                              "or target.domain in the config.")  # fmt: skip
        return table.target[:, None], np.ones(1)
    return table.val, objective_weights(domains, objective)


def choose(
    table: SweepTable,
    domains: list[str],
    method: str = "dml",
    objective: str = "avg",
    regressor: str = "gbr",
    floor: float = 0.0,
    prior: np.ndarray | None = None,
    seed: int = 0,
    candidates: int = 100_000,
) -> dict[str, Any]:
    """Every method's weights (those that have enough runs) and the chosen one's, as JSON."""
    from mixlab.offline.mixlaw import dml_mixture, project_floor
    from mixlab.offline.regmix import regmix_mixture
    from mixlab.offline.sweep import round_mixture

    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    R, m = table.mixtures.shape
    if R == 0:
        raise MixlabError("no proxy run has finished; nothing to fit.")
    if not 0.0 <= floor <= 1.0 / m:
        raise ConfigError(f"--floor must be in [0, 1/m] = [0, {1.0 / m:.4g}], got {floor}.")
    Y, w = objective_of(table, domains, objective)
    obj = Y @ w
    results: dict[str, Any] = {}
    notes: list[str] = []
    best = int(np.argmin(obj))
    results["best"] = {"weights": project_floor(table.mixtures[best], floor), "run": table.names[best],
                       "observed_objective": float(obj[best])}  # fmt: skip
    try:
        res = dml_mixture(table.mixtures, Y, objective=w, floor=floor)
        q = res.fit.quality
        results["dml"] = {
            "weights": res.weights, "predicted_objective": res.predicted_objective,
            "gap": res.gap, "nearest_run_l1": res.nearest_run_l1,
            "fit": {"r2": q.r2.tolist(), "loo_r2": q.loo_r2.tolist(), "mse": q.mse.tolist(),
                    "loo_mse": q.loo_mse.tolist(), "c": res.fit.c.tolist(),
                    "b": res.fit.b.tolist(), "A": res.fit.A.tolist()},
        }  # fmt: skip
    except ConfigError as exc:
        if method == "dml":
            raise
        notes.append(f"dml skipped: {exc}")
    try:
        rm = regmix_mixture(table.mixtures, obj, kind=regressor, prior=prior,
                            n_candidates=candidates, top_k=min(100, candidates), seed=seed)
        results["regmix"] = {
            "weights": project_floor(rm.weights, floor), "regressor": regressor,
            "predicted_objective": rm.predicted_objective, "top_k": rm.top_k,
            "n_candidates": rm.n_candidates,
            "fit": {"r2": rm.fit.r2, "cv_r2": rm.fit.cv_r2, "mse": rm.fit.mse, "cv_mse": rm.fit.cv_mse},
        }  # fmt: skip
    except ConfigError as exc:
        if method == "regmix":
            raise
        notes.append(f"regmix skipped: {exc}")
    for r in results.values():  # rounded to 6 decimals: readable --set lines, still sum to 1
        r["weights"] = dict(zip(domains, map(float, round_mixture(r["weights"]))))
    chosen = results[method]["weights"]
    return {
        "domains": domains, "objective": objective, "method": method, "weights": chosen,
        "runs": R, "extra_steps": table.steps, "methods": results, "notes": notes,
        "set": set_lines(chosen),
    }  # fmt: skip


def toml_table(weights: dict[str, float]) -> str:
    """``{a = 0.25, b = 0.75}``: an inline TOML table for ``--set``."""
    from mixlab.config import _inline

    return _inline(weights)


def set_lines(weights: dict[str, float]) -> dict[str, str]:
    """The ``--set`` arguments that train on ``weights``, as a fixed mixture or Aioli's prior."""
    t = toml_table(weights)
    return {
        "fixed": f"--set mixer.name=fixed --set 'mixer.options.weights={t}'",
        "aioli_prior": f"--set mixer.name=aioli --set 'mixer.options.prior={t}'",
    }


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


def summary_text(result: dict[str, Any]) -> str:
    """The methods' weights side by side, fit quality, and the --set lines of the chosen one."""
    doms = result["domains"]
    lines = [f"{result['runs']} proxy runs, {result['extra_steps']} steps; objective: "
             f"{result['objective']} validation loss", "",
             "method   " + "  ".join(f"{d:>10s}" for d in doms) + "  objective"]  # fmt: skip
    for name, r in result["methods"].items():
        value = r.get("predicted_objective", r.get("observed_objective"))
        kind = "observed" if name == "best" else "predicted"
        lines.append(f"{name:8s} " + "  ".join(f"{r['weights'][d]:10.4f}" for d in doms)
                     + f"  {value:.4f} ({kind})")  # fmt: skip
    if "dml" in result["methods"]:
        fit = result["methods"]["dml"]["fit"]
        lines.append("dml fit: R² " + ", ".join(f"{v:.3f}" for v in fit["r2"]) + "; leave-one-out R² "
                     + ", ".join(f"{v:.3f}" for v in fit["loo_r2"]))  # fmt: skip
    if "regmix" in result["methods"]:
        fit = result["methods"]["regmix"]["fit"]
        lines.append(f"regmix fit: R² {fit['r2']:.3f}; cross-validated R² {fit['cv_r2']:.3f}")
    lines += [f"note: {n}" for n in result["notes"]]
    lines += ["", f"chosen ({result['method']}):", "  " + result["set"]["fixed"],
              "  " + result["set"]["aioli_prior"]]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The final run and its accounting


def final_spec(plan: SweepPlan, weights: dict[str, float]) -> RunSpec:
    from mixlab.config import from_dict
    from mixlab.report.compare import RunSpec
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
    from mixlab.report.compare import Progress, run_all, subprocess_launcher

    launcher = launcher or subprocess_launcher
    progress = progress or Progress(enabled=False)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_configs(plan)
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
        import tomli_w

        spec.config_path.write_text(tomli_w.dumps(spec.config), encoding="utf-8")
        out = run_all([spec], jobs=1, launcher=launcher, progress=progress, poll_s=poll_s, force=force)
        if out[spec.key] in ("failed", "skipped"):
            raise MixlabError(f"the final run {spec.run_dir} did not finish; see {plan.out / 'logs'}.")
        result["final"] = account_final(spec.run_dir, result, plan.out)
    return result


def run(args: argparse.Namespace) -> int:
    from mixlab.report.compare import Progress

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}.")
    plan = plan_sweep(
        args.config, args.out, args.n, args.overrides, args.proxy_overrides, mode=args.mode,
        prior=args.prior, concentration=args.concentration, resolution=args.resolution,
        seed=args.seed,
    )  # fmt: skip
    result = sweep(plan, method=args.method, objective=args.objective, regressor=args.regressor,
                   floor=args.floor, candidates=args.candidates, final=args.final, jobs=args.jobs,
                   progress=Progress(enabled=not args.quiet), force=args.force)  # fmt: skip
    print(summary_text(result))
    print(f"\nwritten: {plan.out / 'mixture.json'}, {plan.out / 'sweep.json'}, {plan.out / 'sweep.csv'}")
    if "final" in result:
        f = result["final"]
        print(f"final run {final_spec(plan, result['weights']).run_dir}: avg test PPL {f['test']['avg_ppl']:.3f}, "
              f"{f['steps']} steps + {f['extra_steps']} extra")
    return 1 if any(v in ("failed", "skipped") for v in result["outcome"].values()) else 0

