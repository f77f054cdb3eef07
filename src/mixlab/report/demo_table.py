"""The demo's main table (``DIR/table.md``) and the README's copy of it.

``mixlab demo`` writes the first table of what it printed to ``DIR/table.md``; the README holds
the same table between marker comments, and ``benchmarks/check_readme_demo.py DIR`` compares the
two with ``readme_differences`` (every cell equal as text, the timing columns aside).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from mixlab.errors import MixlabError

TABLE_FILE = "table.md"
"""The demo's main table, written into the compare dir next to comparison.md."""
README_START = "<!-- demo-table:start -->"
README_END = "<!-- demo-table:end -->"
"""Marker comments around the demo table in README.md (the table is the lines between them
that start with ``|``)."""



def main_table(markdown: str) -> str:
    """The first Markdown table of ``markdown`` (compare's output: its main table), as the lines
    that start with ``|``, each without trailing spaces, ending with a newline."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("|")), None)
    if start is None:
        raise MixlabError("the demo's output has no Markdown table.")
    table = []
    for ln in lines[start:]:
        if not ln.lstrip().startswith("|"):
            break
        table.append(ln.strip())
    return "\n".join(table) + "\n"


def write_table(out: str | Path, markdown: str) -> Path:
    """Write ``OUT/table.md``: the main table of the demo's ``markdown``; returns its path."""
    path = Path(out) / TABLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(main_table(markdown), encoding="utf-8")
    return path


def _marker_lines(text: str, where: str) -> tuple[list[str], int, int]:
    lines = text.splitlines()
    found = {m: [i for i, ln in enumerate(lines) if ln.strip() == m] for m in (README_START, README_END)}
    for marker, at in found.items():
        if len(at) != 1:
            raise MixlabError(
                f"{where} must hold the line {marker} exactly once (found {len(at)} times)."
            )
    start, end = found[README_START][0], found[README_END][0]
    if end < start:
        raise MixlabError(f"{where}: {README_END} comes before {README_START}.")
    return lines, start, end


def readme_table(text: str, where: str = "README.md") -> str:
    """The table between the demo-table markers of the README ``text`` (its lines that start
    with ``|``), in the form ``main_table`` returns."""
    lines, start, end = _marker_lines(text, where)
    table = [ln.strip() for ln in lines[start + 1 : end] if ln.lstrip().startswith("|")]
    if not table:
        raise MixlabError(f"{where} has no table between {README_START} and {README_END}.")
    return "\n".join(table) + "\n"


def replace_readme_table(text: str, table: str, where: str = "README.md") -> str:
    """``text`` with the lines between the demo-table markers replaced by ``table`` (blank lines
    around it); everything outside the markers is kept byte for byte."""
    lines, start, end = _marker_lines(text, where)
    new = [*lines[: start + 1], "", *table.rstrip("\n").splitlines(), "", *lines[end:]]
    return "\n".join(new) + ("\n" if text.endswith("\n") else "")


def parse_table(table: str) -> tuple[list[str], list[list[str]]]:
    """A Markdown table -> (header cells, body rows of cells); the ``---`` separator row is
    dropped. Cells are stripped; a table cell never holds ``|`` in compare's output."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines()
            if ln.strip()]
    if not rows:
        return [], []
    body = [r for r in rows[1:] if not all(set(c) <= set("-: ") and c for c in r)]
    return rows[0], body


def is_timing_column(name: str) -> bool:
    """Columns that measure wall time, which differs between two runs of the same demo on the
    same machine (everything else in the table is a deterministic function of the runs)."""
    return name.startswith("wall time") or name.startswith("time vs ")


def readme_differences(readme: str, run: str, strict: bool = False) -> list[str]:
    """How the README's demo table ``readme`` differs from a demo run's ``table.md`` ``run``,
    one line per difference (empty = in step). The header and the methods must be the same, in
    the same order, and every cell equal as text, except the timing columns
    (``is_timing_column``) unless ``strict``."""
    head_r, rows_r = parse_table(readme)
    head_x, rows_x = parse_table(run)
    if head_r != head_x:
        return [f"the columns differ: README has {head_r}, the run has {head_x}."]
    out: list[str] = []
    names_r = [r[0].strip("*") for r in rows_r]
    names_x = [r[0].strip("*") for r in rows_x]
    if names_r != names_x:
        out.append(f"the methods differ: README has {names_r}, the run has {names_x}.")
    by_name = dict(zip(names_x, rows_x))
    for name, row in zip(names_r, rows_r):
        other = by_name.get(name)
        if other is None:
            continue
        if len(row) != len(head_r) or len(other) != len(head_r):
            out.append(f"row {name!r}: {len(row)} cells in README, {len(other)} in the run, "
                       f"{len(head_r)} columns.")
            continue
        for col, a, b in zip(head_r, row, other):
            if a != b and (strict or not is_timing_column(col)):
                out.append(f"row {name!r}, column {col!r}: README {a}, run {b}")
    return out


def table_diff(readme: str, run: str) -> str:
    """A unified diff from the README's table to the run's (for the eye; timing included)."""
    return "".join(difflib.unified_diff(
        readme.splitlines(keepends=True), run.splitlines(keepends=True),
        fromfile="README.md (demo table)", tofile="demo run (table.md)",
    ))
