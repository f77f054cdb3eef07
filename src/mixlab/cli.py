"""The ``mixlab`` command line. Each subcommand lives in ``mixlab.commands.<name>`` and defines
``add_parser(subparsers)`` and ``run(args) -> int``.

User errors (``MixlabError``) print one message and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mixlab import __version__
from mixlab.errors import MixlabError, Stopped
from mixlab.orchestrate.launch import MALLOC_ENV  # README names it mixlab.cli.MALLOC_ENV

COMMANDS = [
    "prepare", "cluster", "train", "compare", "report", "demo", "lmo", "doremi", "sweep", "select",
    "verify", "export",
]


def _available() -> list[tuple[str, object]]:
    mods = []
    for name in COMMANDS:
        try:
            mods.append((name, importlib.import_module(f"mixlab.commands.{name}")))
        except ModuleNotFoundError as exc:
            if exc.name != f"mixlab.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixlab",
        description="Dynamic data mixing and data weighting for language-model training.",
    )
    parser.add_argument("--version", action="version", version=f"mixlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, mod in _available():
        mod.add_parser(sub)  # type: ignore[attr-defined]
    return parser


def entry() -> None:
    """The ``mixlab`` console script: re-executes once with ``MALLOC_ENV`` set, then runs."""
    import os

    missing = {k: v for k, v in MALLOC_ENV.items() if k not in os.environ}
    if missing and sys.platform.startswith("linux") and not os.environ.get("MIXLAB_NO_REEXEC"):
        os.environ.update(missing)
        os.environ["MIXLAB_NO_REEXEC"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "mixlab", *sys.argv[1:]])
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Stopped as exc:  # a signal asked the run to stop; it wrote a checkpoint first
        print(f"mixlab {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MixlabError as exc:
        print(f"mixlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    entry()
