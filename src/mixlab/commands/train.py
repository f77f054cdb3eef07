"""``mixlab train CONFIG.toml [--set key=value ...] [--out RUN_DIR] [--resume]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a mixing method",
        description="Train a language model on a prepared data dir, choosing the domain mixture "
        "with a mixing method. Writes config.toml, metrics.jsonl, checkpoints and summary.json.",
    )
    p.add_argument("config", nargs="?", help="TOML config (defaults are used for missing keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--out", help="run dir (default: runs/<mixer>-seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a finished run is a no-op)")
    p.add_argument("--print-config", action="store_true",
                   help="print the full resolved config with the documentation of every field, then exit")
    p.add_argument("--list-mixers", action="store_true", help="list the available mixing methods, then exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.config import Subtable, describe, from_dict
    from mixlab.mixers.base import MIXERS, mixer_class
    from mixlab.weighting.base import Weighter

    if args.list_mixers:
        import mixlab.mixers  # noqa: F401

        for name in sorted(MIXERS):
            cls = MIXERS[name]
            kind = "dynamic" if cls.dynamic else "static"
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:14s} {kind:8s} {doc}")
        return 0

    from mixlab.train.config import TrainConfig, load_config

    cfg: TrainConfig = load_config(args.config, args.overrides)
    if args.print_config:
        # mixer.options is written once, as the documented [mixer.options] table of the chosen
        # mixer (not also as `options = {...}` under [mixer], which TOML refuses as a second
        # declaration), so the printed text is a config file that loads back to this config;
        # options left at their defaults stay commented, so they stay unset when loaded back.
        options_cls = mixer_class(cfg.mixer.name).Config
        opts = from_dict(options_cls, cfg.mixer.options, where="mixer.options")
        note = (f"options of mixer '{cfg.mixer.name}' (a commented option takes the value "
                "shown, its default)" if dataclasses.fields(options_cls)
                else f"mixer '{cfg.mixer.name}' has no options")  # fmt: skip
        sub = Subtable(options_cls, opts, note, given=set(cfg.mixer.options))
        # The same for the chosen weighter's [weighting.options] (an empty table without one).
        w = cfg.weighting
        wsub = (Subtable(type(w.weighter_config()), w.weighter_config(),
                         f"options of weighter '{w.name}' (a commented option takes the value "
                         "shown, its default)", given=set(w.options))
                if w.enabled else Subtable(Weighter.Config, Weighter.Config(),
                                           "options of the weighter set by weighting.name"))  # fmt: skip
        subtables = {"mixer.options": sub, "weighting.options": wsub}
        print(describe(TrainConfig, instance=cfg, subtables=subtables), end="")
        return 0

    from mixlab.train.loop import train

    out = args.out or f"runs/{cfg.mixer.name}-seed{cfg.train.seed}"
    summary = train(cfg, out, resume=args.resume, log=lambda msg: print(msg, file=sys.stderr))
    test = summary["test"]
    print(json.dumps({"run": out, "avg_test_ppl": test["avg_ppl"], "test_ppl": test["ppl"]}, indent=2))
    return 0
