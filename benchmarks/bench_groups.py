"""The "groups" benchmark: a CPU-sized analogue of Aioli's Table 2.

Settings on the built-in corpus: two different domain pairs, three domains, and all five.
Methods: stratified, DoReMi, ODM, Skill-It, Aioli and DoGE (when registered), each over the
same seeds, model, budget and evaluation (``mixlab compare``), and two offline searches that
share one sweep per setting (``mixlab sweep``, grid mode, 2m + 2 proxy runs of
``--sweep-steps`` steps): ``grid`` trains on the sweep's best observed mixture (grid search),
``dml`` on the data mixing law's optimum; their runs' extra steps are the sweep's steps.
Prints, per setting and method, the paired difference of average test perplexity from
stratified (mean ± std over seeds), the settings each method beats stratified in, its wall time
over stratified's, and its extra training steps.

    python benchmarks/bench_groups.py [--seeds 3] [--steps 300] [--jobs 2] [--out runs/groups]
                                      [--methods stratified,grid,dml] [--sweep-steps 100]
                                      [--set mixers.aioli.options.variant=adaptive ...]

Finished runs are reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import statistics
import sys
from pathlib import Path
from typing import Any

from mixlab.config import apply_overrides
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.mixers.base import MIXERS, mixer_class
from mixlab.orchestrate.compare import ComparePlan, compare, plan_compare
from mixlab.orchestrate.demo import cache_dir, load_demo_config
from mixlab.orchestrate.scheduler import Progress
from mixlab.orchestrate.sweep import account_final, plan_sweep, sweep
from mixlab.report.runs import load_run
from mixlab.report.table import build_comparison, to_csv

SETTINGS = {
    "code+legal": ["code", "legal"],
    "literature+news": ["literature", "news"],
    "code+medical+news": ["code", "medical", "news"],
    "all 5": ["code", "legal", "literature", "medical", "news"],
}
METHODS = ["stratified", "doremi", "odm", "skillit", "aioli", "doge"]
OFFLINE = {"grid": "best", "dml": "dml"}
"""Offline rows -> the sweep method whose weights their runs train on."""


def offline_rows(
    raw: dict[str, Any], base: ComparePlan, out: Path, names: list[str], args: argparse.Namespace
) -> dict[str, list[dict[str, str]]]:
    """Sweep once, train each offline method's mixture over the seeds, pair with stratified."""
    m = len(raw["data"]["domains"])
    sp = plan_sweep(None, out / "sweep", 2 * m + 2, raw=raw, mode="grid",
                    proxy_overrides=[f"train.steps={args.sweep_steps}"])  # fmt: skip
    print(f"== sweep: {len(sp.specs)} proxy runs -> {sp.out}", file=sys.stderr, flush=True)
    result = sweep(sp, method="dml", jobs=args.jobs, progress=Progress())
    strat = [s for s in base.specs if s.mixer == "stratified"]
    rows: dict[str, list[dict[str, str]]] = {}
    for name in names:
        weights = result["methods"][OFFLINE[name]]["weights"]
        print(f"== {name}: {weights}", file=sys.stderr, flush=True)
        oraw = copy.deepcopy(raw)
        oraw["mixers"] = {"fixed": {"options": {"weights": weights}}}
        plan = plan_compare(None, out / name, mixers=["fixed"], seeds=args.seeds, raw=oraw)
        compare(plan, jobs=args.jobs, progress=Progress(), title=f"groups: {name}")
        runs = []
        for spec in [*strat, *plan.specs]:
            if spec.mixer == "fixed":
                account_final(spec.run_dir, {**result, "method": OFFLINE[name]}, sp.out)
            run = load_run(spec.run_dir)
            run.label = name if spec.mixer == "fixed" else "stratified"
            runs.append(run)
        table = to_csv(build_comparison(runs, order=["stratified", name]))
        rows[name] = [r for r in csv.DictReader(io.StringIO(table)) if r["method"] == name]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/groups")
    ap.add_argument("--methods", default=",".join([*METHODS, *OFFLINE]),
                    help="comma-separated; stratified is always run (the baseline)")
    ap.add_argument("--sweep-steps", type=int, default=100, help="steps of each proxy run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the benchmark's config, e.g. mixers.aioli.options.variant=adaptive")
    args = ap.parse_args()

    data_dir = cache_dir() / "builtin-v2048"
    prepare(PrepareConfig(source="builtin", out=str(data_dir), vocab_size=2048))
    mixer_class("stratified")
    asked = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [m for m in METHODS if m in MIXERS and (m in asked or m == "stratified")]
    offline = [m for m in OFFLINE if m in asked]
    rows: dict[str, dict[str, list[dict[str, str]]]] = {}
    for setting, domains in SETTINGS.items():
        raw = apply_overrides(load_demo_config(), [
            f"train.steps={args.steps}",
            "eval.every=100",
            "eval.windows=16",
            "eval.signal_windows=8",
            "eval.test_windows=64",
            # Aioli: 2 rounds of 150 steps, each probing every domain once for 2 steps.
            "mixers.aioli.options.round_steps=150",
            "mixers.aioli.options.lp_rounds=1",
            "mixers.aioli.options.lp_steps=2",
            "mixers.skillit.options.graph_steps=15",
            "mixers.skillit.options.graph_at_step=50",
            "mixers.skillit.options.update_every=50",
            "mixers.skillit.options.eval_every=25",
            *args.overrides,
        ])
        raw.pop("demo", None)
        raw.pop("target", None)
        raw["data"]["dir"] = str(data_dir)
        raw["data"]["domains"] = domains
        raw["mixers"] = {k: v for k, v in raw.get("mixers", {}).items() if k in methods}
        out = Path(args.out) / setting.replace("+", "_").replace(" ", "")
        plan = plan_compare(None, out, mixers=methods, seeds=args.seeds, raw=raw)
        print(f"== {setting}: {len(plan.specs)} runs -> {out}", file=sys.stderr, flush=True)
        compare(plan, jobs=args.jobs, progress=Progress(), title=f"groups: {setting}")
        with open(out / "comparison.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                rows.setdefault(setting, {}).setdefault(r["method"], []).append(r)
        if offline:
            rows[setting].update(offline_rows(raw, plan, out, offline, args))

    print(f"\nAverage test perplexity, paired difference from stratified (mean ± std over "
          f"{args.seeds} seeds); {args.steps} steps, d64/L2 GPT, vocab 2048, batch 16 x 128.\n")
    header = ("| method | " + " | ".join(SETTINGS)
              + " | beats stratified | wall time vs stratified | extra steps per run |")  # fmt: skip
    print(header)
    print("|" + "---|" * (len(SETTINGS) + 4))
    for m in [*methods, *offline]:
        cells, wins, ratios, extra = [], 0, [], []
        for setting in SETTINGS:
            runs = [r for r in rows[setting].get(m, []) if r["seed"] not in ("", "mean", "std")]
            diffs = [float(r["diff_avg_ppl"]) for r in runs if r["diff_avg_ppl"]]
            ratios += [float(r["time_ratio"]) for r in runs if r["time_ratio"]]
            extra += [int(r["extra_steps"]) for r in runs if r["extra_steps"]]
            base = [float(r["avg_test_ppl"]) for r in rows[setting]["stratified"]
                    if r["seed"] not in ("", "mean", "std")]
            if m == "stratified":
                cells.append(f"{statistics.mean(base):.2f} (absolute)")
                continue
            mean = statistics.mean(diffs)
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            noise = abs(mean) <= 2 * std / len(diffs) ** 0.5
            wins += mean < 0
            cells.append(f"{mean:+.2f} ± {std:.2f}{' (noise)' if noise else ''}")
        ratio = f"{statistics.mean(ratios):.3f}" if ratios else "1.000"
        won = "—" if m == "stratified" else f"{wins}/{len(SETTINGS)}"
        steps = f"{min(extra)}–{max(extra)}" if extra and min(extra) != max(extra) else str(max(extra, default=0))
        print(f"| {m} | " + " | ".join(cells) + f" | {won} | {ratio} | {steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
