"""The data weighting model's section of a report: mean weight per domain and stage, and the
highest- and lowest-weighted samples of each stage (from RUN/dwm.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixlab.report.runs import Run
from mixlab.weighting.dwm import ANALYSIS_FILE

SNIPPET_CHARS = 90


def read_analysis(run_dir: Path) -> dict[str, Any] | None:
    """RUN/dwm.json, or None when the run has none (or it cannot be read)."""
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) > SNIPPET_CHARS:
        flat = flat[: SNIPPET_CHARS - 1] + "…"
    # Pipes and backquotes would break the table cell or the inline code.
    return flat.replace("|", "/").replace("`", "'")


def run_section(run: Run, analysis: dict[str, Any]) -> list[str]:
    domains: list[str] = list(analysis.get("domains", []))
    how = "loaded from `" + analysis["loaded_from"] + "`" if analysis.get("loaded_from") else "trained in this run"
    frozen = ", frozen" if analysis.get("frozen") else ""
    lines = [
        f"### {run.label or run.mixer}, seed {run.seed}",
        "",
        f"Weighting model {how}{frozen}; {analysis.get('updates', 0)} bi-level updates. "
        "Mean weight of each domain's samples per stage (1 = the batch average):",
        "",
        "| stage | steps | " + " | ".join(domains) + " |",
        "|---|---|" + "---|" * len(domains),
    ]
    for st in analysis.get("stages", []):
        cells = [
            "–" if st["mean_weight"].get(d) is None else f"{st['mean_weight'][d]:.3f}" for d in domains
        ]
        lines.append(f"| {st['stage'] + 1} | {st['steps'][0]}–{st['steps'][1]} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | weight | domain | sample (start) |", "|---|---|---|---|"]
    for st in analysis.get("stages", []):
        for kind in ("highest", "lowest"):
            for e in st.get(kind, []):
                lines.append(
                    f"| {st['stage'] + 1} ({kind}) | {e['weight']:.3f} | {e['domain']} | "
                    f"`{_snippet(e['text'])}` |"
                )
    return [*lines, ""]


def dwm_markdown(runs: list[Run]) -> str:
    """The '## Data weighting model' section for the runs that have one ('' if none)."""
    parts: list[str] = []
    for run in runs:
        analysis = read_analysis(run.path)
        if analysis:
            parts += run_section(run, analysis)
    if not parts:
        return ""
    return "\n".join(["## Data weighting model", "", *parts])
