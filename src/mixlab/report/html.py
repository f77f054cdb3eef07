"""``mixlab report``: PNG figures, a Markdown summary and one self-contained HTML file.

The HTML embeds every figure as a base64 PNG and its style inline: it opens offline, can be
mailed as one file, and loads nothing from the network. The Markdown summary holds the same
table and links the PNGs by relative path (for a terminal, a repository or a notebook).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mixlab import __version__
from mixlab.errors import MixlabError
from mixlab.report import plots
from mixlab.report.dwm import dwm_markdown
from mixlab.report.runs import PLAN_FILE, Run, collect_runs, is_compare_dir
from mixlab.report.table import Comparison, build_comparison, to_markdown

REPORT_HTML = "report.html"
SUMMARY_MD = "summary.md"


@dataclass
class Report:
    """What ``build_report`` wrote."""

    out: Path
    html: Path
    markdown: Path
    figures: list[plots.FigureInfo] = field(default_factory=list)
    comparison: Comparison | None = None
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _plan_of(paths: list[Path]) -> tuple[list[str] | None, str | None]:
    """(method order, baseline) from a single compare dir's compare.json, else (None, None)."""
    if len(paths) != 1 or not is_compare_dir(paths[0]):
        return None, None
    plan_file = paths[0] / PLAN_FILE
    if not plan_file.is_file():
        return None, None
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None, None
    return list(plan.get("mixers") or []) or None, plan.get("baseline") or None


def build_report(
    paths: list[str | Path],
    out: str | Path,
    all_seeds: bool = False,
    title: str = "mixlab report",
) -> Report:
    """Read run dirs and/or compare dirs and write the report into ``out``."""
    src = [Path(p) for p in paths]
    runs = collect_runs(src)
    order, baseline = _plan_of(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        notes.append(
            f"{len(unfinished)} run(s) have not finished ({', '.join(str(r.path) for r in unfinished)}): "
            "their curves are shown so far, but they are not in the table."
        )
    cmp: Comparison | None = None
    if len(runs) > len(unfinished):
        labels = {r.label for r in runs if r.finished}
        cmp = build_comparison(runs, baseline=baseline if baseline in labels else None, order=order)

    methods = [m.method for m in cmp.methods] if cmp else []
    for r in runs:
        if r.label not in methods:
            methods.append(r.label)
    colors = plots.method_colors(methods, cmp.baseline if cmp else None)
    ordered = sorted(runs, key=lambda r: (methods.index(r.label), r.seed))

    figures = [
        plots.plot_weights(ordered, out / "weights.png", all_seeds=all_seeds),
        plots.plot_eval_losses(ordered, out / "eval_loss.png", colors),
        *_comparison_figures(cmp, out, colors),
        plots.plot_tokens(ordered, out / "tokens.png", colors),
    ]
    figs = [f for f in figures if f is not None]
    table_md = to_markdown(cmp, title="Results") if cmp else ""
    if weighting_md := dwm_markdown(ordered):
        table_md = f"{table_md}\n\n{weighting_md}" if table_md else weighting_md
    md = summary_markdown(title, table_md, figs, notes, ordered)
    md_path = out / SUMMARY_MD
    md_path.write_text(md, encoding="utf-8")
    html_path = out / REPORT_HTML
    html_path.write_text(render_html(title, table_md, figs, out, notes, ordered), encoding="utf-8")
    return Report(out, html_path, md_path, figs, cmp, ordered, notes)


def _comparison_figures(
    cmp: Comparison | None, out: Path, colors: dict[str, str]
) -> list[plots.FigureInfo]:
    """comparison.png; with runs of several budgets one figure per budget (comparison.png,
    comparison-2.png, ...), each paired within its budget like its table."""
    if cmp is None:
        return []
    if not cmp.groups:
        return [plots.plot_comparison(cmp, out / "comparison.png", colors)]
    figs = []
    for k, group in enumerate(cmp.groups, 1):
        name = "comparison.png" if k == 1 else f"comparison-{k}.png"
        fig = plots.plot_comparison(group, out / name, colors)
        figs.append(dataclasses.replace(fig, title=f"{fig.title}, {group.budgets[0].text}"))
    return figs


def _sources(runs: list[Run]) -> list[str]:
    return [f"{r.label} seed {r.seed}: `{r.path}`" for r in runs]


def summary_markdown(
    title: str, table_md: str, figures: list[plots.FigureInfo], notes: list[str], runs: list[Run]
) -> str:
    """The Markdown summary: the table (headings one level down) and the figures by path."""
    lines = [f"# {title}", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    if table_md:
        lines += [_demote(table_md), ""]
    else:
        lines += ["No run has finished yet: no table.", ""]
    for fig in figures:
        lines += [f"## {fig.title}", "", f"![{fig.title}]({fig.name})", "", fig.caption, ""]
    lines += ["## Runs", ""] + [f"- {s}" for s in _sources(runs)] + [""]
    return "\n".join(lines)


def _demote(md: str) -> str:
    return re.sub(r"^(#+) ", r"#\1 ", md, flags=re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 10px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; margin-top: .4em; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; font-size: 90%; }
.note { background: #fff8e1; border-left: 4px solid #f0c000; padding: .5em 1em; }
.meta { color: #777; font-size: 13px; }
ul.runs { font-size: 13px; color: #444; }
"""


def render_html(
    title: str,
    table_md: str,
    figures: list[plots.FigureInfo],
    fig_dir: Path,
    notes: list[str],
    runs: list[Run],
) -> str:
    """One HTML page with the table and every figure embedded as a data: URI."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">mixlab {__version__} · generated {now} · {len(runs)} run(s)</p>',
    ]
    parts += [f'<p class="note">{_inline(n)}</p>' for n in notes]
    if table_md:
        parts.append(markdown_to_html(_demote(table_md)))
    else:
        parts.append("<p>No run has finished yet: no table.</p>")
    for fig in figures:
        data = base64.b64encode((fig_dir / fig.name).read_bytes()).decode("ascii")
        parts += [
            f"<h2>{html.escape(fig.title)}</h2>",
            f'<figure><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{data}">',
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>",
        ]
    parts.append('<h2>Runs</h2><ul class="runs">')
    parts += [f"<li>{_inline(s)}</li>" for s in _sources(runs)]
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


_NUMERIC = re.compile(r"^[\s+\-–]*[\d.]+.*$|^–$")


def markdown_to_html(md: str) -> str:
    """HTML for the Markdown subset that ``to_markdown`` writes: headings, pipe tables, bullet
    lists, paragraphs, **bold** and `code`. Everything else is escaped text."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := re.match(r"^(#{1,6}) (.*)$", line):
            level = len(m.group(1))
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||- )", lines[i]):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _table(rows: list[str]) -> str:
    head = _cells(rows[0])
    body = [_cells(r) for r in rows[2:]] if len(rows) > 1 else []
    parts = ["<table><thead><tr>"]
    parts += [f"<th>{_inline(c)}</th>" for c in head]
    parts.append("</tr></thead><tbody>")
    for r in body:
        parts.append(
            "<tr>"
            + "".join(
                f'<td class="num">{_inline(c)}</td>'
                if j and _NUMERIC.match(c)
                else f"<td>{_inline(c)}</td>"
                for j, c in enumerate(r)
            )
            + "</tr>"
        )
    parts.append("</tbody></table>")
    return "".join(parts)


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def report_paths_or_error(paths: list[str]) -> list[Path]:
    """The paths as Paths, or a clear error for a missing one."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise MixlabError(f"no such run or compare dir: {', '.join(missing)}.")
    return [Path(p) for p in paths]
