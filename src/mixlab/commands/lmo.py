"""``mixlab lmo RUN_DIR [RUN_DIR ...] --out DIR [--window W] [--ridge R] [--no-pool]``.

Fits the LMO framework's mixing laws (``mixlab.lmo``) to what runs logged and writes
``DIR/lmo.md``, ``DIR/lmo.json`` and PNG plots. What is read from each run, and the fits:
``mixlab.orchestrate.lmo_runs`` (whose ``lmo_section`` gives the same analysis as a report
section); the Markdown, JSON and plots: ``mixlab.report.lmo`` and ``mixlab.report.lmo_plots``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lmo",
        help="fit the LMO mixing laws (linear dynamic, static log-linear) to logged runs",
        description="Fit the linear dynamic mixing law L^{t+1} = L^t - A^t p^t per window of "
        "evaluations (per run, and pooled across runs) and the static law L(p) = c + b "
        "exp(-A p) across runs on fixed mixtures; report fit quality per domain, the fitted A, "
        "and the distance between DoReMi's or Aioli's own A and the fitted one. Writes "
        "DIR/lmo.md, DIR/lmo.json and PNG plots.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run dirs (mixlab train --out) or compare dirs (mixlab compare --out)")
    p.add_argument("--out", required=True, help="output dir for lmo.md, lmo.json and plots")
    p.add_argument("--window", type=int, default=0, metavar="W",
                   help="transitions (intervals between consecutive evaluations) per window "
                   "of A^t; 0 = one window over the whole run (default)")
    p.add_argument("--ridge", type=float, default=0.0,
                   help="ridge penalty, relative to tr(P^T P)/m; 0 = least squares, "
                   "minimum-norm when the mixtures do not determine A (default)")
    p.add_argument("--no-pool", action="store_true",
                   help="do not fit the law on all runs' windows stacked together")
    p.set_defaults(run=run)



def run(args: argparse.Namespace) -> int:
    from mixlab.errors import ConfigError
    from mixlab.orchestrate.lmo_runs import analyse, write_analysis
    from mixlab.report.lmo import summary_lines

    if args.window < 0:
        raise ConfigError(f"--window must be >= 0, got {args.window}.")
    if not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise ConfigError(f"--ridge must be a finite number >= 0, got {args.ridge}.")
    result = analyse(args.runs, window=args.window, ridge=args.ridge, pool=not args.no_pool)
    md, js, n_images = write_analysis(result, args.out)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {md}, {js} and {n_images} plot(s)")
    return 0
