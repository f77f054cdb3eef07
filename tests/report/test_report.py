"""mixlab report: from one finished run, from several run dirs and from a compare dir."""

from __future__ import annotations

import json
import re

import pytest

from mixlab.cli import main
from mixlab.errors import MixlabError
from mixlab.report.html import build_report, markdown_to_html
from mixlab.report.plots import outlier_limit, token_scale, weight_series
from mixlab.report.runs import collect_runs, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_self_contained(html: str, n_images: int) -> None:
    assert html.count('src="data:image/png;base64,') == n_images
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    assert "<link" not in html and "<script" not in html


def test_report_from_one_finished_run(tmp_path, make_run):
    run = make_run(tmp_path / "run", "aioli", 0, {"code": 10.0, "legal": 20.0, "news": 30.0})
    report = build_report([run], tmp_path / "rep")
    names = [f.name for f in report.figures]
    assert names == ["weights.png", "eval_loss.png", "comparison.png", "tokens.png"]
    for name in names:
        assert (tmp_path / "rep" / name).read_bytes()[:8] == PNG_MAGIC
    html = report.html.read_text()
    _check_self_contained(html, 4)
    assert "<td><strong>aioli</strong></td>" in html  # the only method is its own baseline
    md = report.markdown.read_text()
    for name in names:
        assert f"]({name})" in md
    assert "| **aioli** | 20.00 | baseline | – |" in md
    assert report.notes == []


def test_report_from_a_compare_dir_follows_its_plan(tmp_path, make_run):
    cmp_dir = tmp_path / "cmp"
    for mixer in ("odm", "stratified"):
        for seed in (0, 1):
            ppl = {"code": 10.0 + seed, "legal": 20.0 - (mixer == "odm")}
            make_run(cmp_dir / "runs" / mixer / f"seed{seed}", mixer, seed, ppl)
    (cmp_dir / "compare.json").write_text(
        json.dumps({"mixers": ["stratified", "odm"], "seeds": [0, 1], "baseline": "stratified"})
    )
    report = build_report([cmp_dir], tmp_path / "rep", title="My comparison")
    assert [m.method for m in report.comparison.methods] == ["stratified", "odm"]
    assert report.comparison.methods[1].diffs == {0: -0.5, 1: -0.5}
    md = report.markdown.read_text()
    assert md.startswith("# My comparison\n")
    assert "| odm | 14.75 ± 0.35 | -0.50 ± 0.00 | 2/2 |" in md
    assert "## Paired difference from stratified per seed" in md  # demoted one level
    html = report.html.read_text()
    _check_self_contained(html, 4)
    assert "<title>My comparison</title>" in html
    assert [(r.label, r.seed) for r in report.runs] == [
        ("stratified", 0), ("stratified", 1), ("odm", 0), ("odm", 1),
    ]  # fmt: skip


def test_report_with_an_unfinished_run(tmp_path, make_run):
    done = make_run(tmp_path / "a", "stratified", 0, {"code": 10.0})
    live = make_run(tmp_path / "b", "odm", 0, {"code": 10.0}, finished=False)
    report = build_report([done, live], tmp_path / "rep")
    assert len(report.notes) == 1 and "1 run(s) have not finished" in report.notes[0]
    assert [m.method for m in report.comparison.methods] == ["stratified"]
    assert "weights.png" in [f.name for f in report.figures]  # the live run's curves show
    assert 'class="note"' in report.html.read_text()


def test_same_mixer_and_seed_from_two_places_get_distinct_labels(tmp_path, make_run):
    a = make_run(tmp_path / "lr-high", "odm", 0, {"code": 10.0})
    b = make_run(tmp_path / "lr-low", "odm", 0, {"code": 9.0})
    c = make_run(tmp_path / "x" / "seed1", "odm", 1, {"code": 9.0})
    runs = collect_runs([a, b, c])
    assert [r.label for r in runs] == ["odm (lr-high)", "odm (lr-low)", "odm (seed1)"]
    report = build_report([a, b], tmp_path / "rep")
    assert report.comparison.baseline == "odm (lr-high)"
    assert report.comparison.methods[1].diffs == {0: -1.0}


def test_weight_series_leaves_out_probe_steps(tmp_path, make_run):
    run_dir = make_run(tmp_path / "r", "aioli", 0, {"a": 1.0, "b": 2.0}, steps=40)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    probe = json.loads(lines[0])
    probe.update(phase="probe", weights={"a": 1.0, "b": 0.0})
    lines[0] = json.dumps(probe)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    tokens, weights, dropped = weight_series(load_run(run_dir))
    assert dropped and tokens.tolist() == [20 * 2048, 30 * 2048, 40 * 2048]
    assert weights.shape == (3, 2)
    assert weights.sum(axis=1) == pytest.approx([1.0, 1.0, 1.0])


def test_weight_series_prefers_loss_weights(tmp_path, make_run):
    run_dir = make_run(tmp_path / "r", "doremi", 0, {"a": 1.0, "b": 2.0}, steps=20)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines[0]["loss_weights"] = {"a": 0.9, "b": 0.1}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, weights, _ = weight_series(load_run(run_dir))
    assert weights[0].tolist() == [0.9, 0.1]
    assert weights[1].tolist() == pytest.approx([0.5 + 0.15, 0.5 * 0.7])


def test_outlier_limit():
    assert outlier_limit([152.5, 158.0, 971.5, 154.3]) == pytest.approx(1.35 * 158.0)
    assert outlier_limit([5.5, 819.0, -7.6, -0.3]) == pytest.approx(1.35 * 7.6)
    assert outlier_limit([1.0, 3.9, 2.0]) is None  # not 4x the next one
    assert outlier_limit([1.0, 100.0]) is None  # too few bars to call one an outlier


def test_target_loss_gets_its_own_comparison_panel(tmp_path, make_run):
    make_run(tmp_path / "s", "stratified", 0, {"a": 10.0, "b": 12.0}, target_loss=3.0)
    make_run(tmp_path / "d", "dga", 0, {"a": 90.0, "b": 12.0}, target_loss=2.5)
    report = build_report([tmp_path / "s", tmp_path / "d"], tmp_path / "rep")
    (fig,) = [f for f in report.figures if f.name == "comparison.png"]
    assert "held-out target set" in fig.caption
    assert "| dga | 51.00 | +40.00 (n=1) | 0/1 | 2.5000 | -0.5000 |" in report.markdown.read_text()


def test_token_scale():
    assert token_scale(5e6) == (1e6, "millions")
    assert token_scale(5e4) == (1e3, "thousands")
    assert token_scale(500) == (1.0, "tokens")


def test_markdown_to_html_escapes_and_renders_tables():
    html = markdown_to_html(
        "# T <x>\n\n| a | b |\n| --- | ---: |\n| **m** | 1.50 ± 0.2 |\n\n- `c` & d\n"
    )
    assert "<h1>T &lt;x&gt;</h1>" in html
    assert "<th>a</th><th>b</th>" in html
    assert '<td><strong>m</strong></td><td class="num">1.50 ± 0.2</td>' in html
    assert "<li><code>c</code> &amp; d</li>" in html


def test_cli_report(tmp_path, make_run, capsys):
    run = make_run(tmp_path / "run", "stratified", 0, {"code": 10.0, "legal": 12.0})
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'rep' / 'report.html'}" in out
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2
    assert "no such run or compare dir" in capsys.readouterr().err


def test_not_a_run_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixlabError, match="neither a run dir"):
        collect_runs([tmp_path / "empty"])
