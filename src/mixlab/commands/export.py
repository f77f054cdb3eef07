"""``mixlab export RUN_DIR --hf DIR``: a finished run as a Hugging Face model directory."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a finished run as a Hugging Face model directory",
        description="Write a finished run as a folder that transformers loads with no custom "
        "code: AutoModelForCausalLM.from_pretrained(DIR) (mixlab's GPT becomes GPT2LMHeadModel, "
        "exactly; model.kind = 'hf' runs are saved with save_pretrained), "
        "AutoTokenizer.from_pretrained(DIR) (the data dir's tokenizer), and a model card "
        "(README.md) with the data dir, the mixture weights and the final metrics. The folder "
        "is written atomically, after checking that its logits match mixlab's. Needs "
        "pip install 'mixlab[hf]'.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run (mixlab train --out)")
    p.add_argument("--hf", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--force", action="store_true", help="replace DIR when it is not empty")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mixlab.model.export import export_run

    done = export_run(args.run_dir, args.hf, force=args.force)
    print(
        f"exported {args.run_dir} as {done.architecture} to {done.path} (logits match mixlab's "
        f"to {done.max_rel_diff:.1e} of their scale)"
    )
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(done.path)!r})")
    return 0
