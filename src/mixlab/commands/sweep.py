"""``mixlab sweep CONFIG --n N --out DIR``: proxy runs on many mixtures, then the best mixture.

The sweep itself, its dir layout, reuse and accounting: ``mixlab.orchestrate.sweep``; the fits:
``mixlab.orchestrate.sweep_fit``.
"""

from __future__ import annotations

import argparse
from typing import Any

from mixlab.orchestrate.sweep_fit import METHODS


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


def run(args: argparse.Namespace) -> int:
    from mixlab.errors import ConfigError
    from mixlab.orchestrate.scheduler import Progress
    from mixlab.orchestrate.sweep import final_spec, plan_sweep, sweep
    from mixlab.orchestrate.sweep_fit import summary_text

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

