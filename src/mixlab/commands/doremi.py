"""``mixlab doremi CONFIG.toml --out DIR [--set ...] [--reference-steps N] [--proxy-steps N]``.

DoReMi end to end: the reference run, the DoReMi proxy, and the final run on the learned weights,
in DIR/reference, DIR/proxy and DIR/final. The stages, their reuse and their accounting:
``mixlab.orchestrate.doremi``.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doremi",
        help="run DoReMi end to end: reference run, proxy run, final run on the learned weights",
        description="Train the reference model (stratified by default), the DoReMi proxy that "
        "learns domain weights from its excess loss over the reference, and the final model "
        "on the proxy's average weights, in DIR/reference, DIR/proxy and DIR/final. Finished "
        "stages are reused and interrupted ones resumed; the final summary's extra_steps "
        "counts the reference and proxy steps. The config's [mixer] table holds DoReMi's "
        "options for the proxy.",
    )
    p.add_argument("config", nargs="?", help="TOML train config shared by the three stages "
                   "(defaults are used for missing keys)")
    p.add_argument("--out", required=True, help="pipeline dir (reference/, proxy/, final/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every stage, e.g. --set train.steps=200 "
                   "or --set mixer.options.eta=0.5 (repeatable)")
    p.add_argument("--final-set", dest="final_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value of the final run only, "
                   "e.g. --final-set model.d_model=256 (repeatable)")
    p.add_argument("--reference-steps", type=int, help="steps of the reference run "
                   "(default: train.steps)")
    p.add_argument("--proxy-steps", type=int, help="steps of the proxy run (default: train.steps)")
    p.add_argument("--reference-mixer", default="stratified",
                   help="mixture of the reference run (default: stratified; e.g. natural)")
    p.add_argument("--reference", metavar="RUN_DIR", help="use this finished run as the "
                   "reference model instead of training one")
    p.add_argument("--force", action="store_true",
                   help="delete and redo stages made with another config (and what depends on them)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.orchestrate.doremi import plan_pipeline, run_pipeline

    plan = plan_pipeline(
        args.config, args.out, args.overrides, args.final_overrides,
        reference_steps=args.reference_steps, proxy_steps=args.proxy_steps,
        reference_mixer=args.reference_mixer, reference=args.reference,
    )  # fmt: skip
    result = run_pipeline(plan, force=args.force)
    print("learned domain weights (the proxy's average α):")
    width = max(len(d) for d in result.weights)
    for d, w in result.weights.items():
        print(f"  {d:<{width}}  {w:.4f}")
    test = result.final["test"]
    per = ", ".join(f"{d} {v:.3f}" for d, v in test["ppl"].items())
    print(f"final run {plan.final_dir}: average test perplexity {test['avg_ppl']:.3f} ({per})")
    print(f"steps: reference {result.reference_steps} + proxy {result.proxy_steps} counted as "
          f"extra_steps = {result.final['extra_steps']}; final run {result.final['steps']}")  # fmt: skip
    return 0

