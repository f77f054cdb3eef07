"""The data weighting model's section of the report."""

from __future__ import annotations

import json

from tests.train.conftest import tiny_overrides

from mixlab.report.dwm import dwm_markdown
from mixlab.report.html import build_report
from mixlab.report.runs import load_run
from mixlab.train.config import load_config
from mixlab.train.loop import train


def test_report_shows_weights_per_stage_and_snippets(tiny_data, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_data, [
        "weighting.name='dwm'", "weighting.options.stages=2", "weighting.options.updates_per_stage=3", "weighting.options.snippets=2",
    ]))
    train(cfg, tmp_path / "dwm")
    train(load_config(None, tiny_overrides(tiny_data)), tmp_path / "plain")
    run = load_run(tmp_path / "dwm")
    assert run.mixer == "stratified+dwm" and load_run(tmp_path / "plain").mixer == "stratified"
    analysis = json.loads((tmp_path / "dwm" / "dwm.json").read_text())
    md = dwm_markdown([run])
    assert md.startswith("## Data weighting model")
    assert "| stage | steps | a | b | c |" in md
    assert "| 1 | 0–12 |" in md and "| 2 | 12–24 |" in md
    top = analysis["stages"][1]["highest"][0]
    assert f"| 2 (highest) | {top['weight']:.3f} | {top['domain']} |" in md
    assert md.count("(lowest)") == 4 and md.count("(highest)") == 4
    rep = build_report([tmp_path / "dwm", tmp_path / "plain"], tmp_path / "report")
    text = rep.markdown.read_text()
    assert "### Data weighting model" in text and "stratified+dwm" in text
    assert "Data weighting model" in rep.html.read_text()
    assert dwm_markdown([load_run(tmp_path / "plain")]) == ""
