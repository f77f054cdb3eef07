"""mixlab demo: the packaged config is valid for every dynamic mixer in the registry."""

from __future__ import annotations

from pathlib import Path

from mixlab.config import from_dict
from mixlab.mixers.base import MIXERS, mixer_class
from mixlab.orchestrate.compare import plan_compare
from mixlab.orchestrate.demo import DemoConfig, cache_dir, demo_config_text, load_demo_config


def test_packaged_demo_config_plans_every_dynamic_mixer(tmp_path):
    raw = load_demo_config()
    assert from_dict(DemoConfig, raw.pop("demo")).vocab_size == 2048
    mixer_class("stratified")
    dynamic = sorted(n for n, c in MIXERS.items() if c.dynamic)
    assert dynamic  # the demo compares something
    assert set(raw["mixers"]) <= set(dynamic)
    raw["data"]["dir"] = str(tmp_path / "data")
    plan = plan_compare(None, tmp_path / "out", mixers=["stratified", *dynamic], raw=raw)
    assert plan.mixers == ["stratified", *dynamic]
    assert {s.steps for s in plan.specs} == {raw["train"]["steps"]}
    if "doremi" in dynamic:
        (doremi,) = [s for s in plan.specs if s.mixer == "doremi"]
        assert doremi.needs == ["stratified/seed0"]


def test_repo_config_is_the_packaged_one():
    repo_copy = Path(__file__).parents[2] / "configs" / "demo.toml"
    assert repo_copy.read_text(encoding="utf-8") == demo_config_text()


def test_cache_dir(monkeypatch):
    monkeypatch.delenv("MIXLAB_CACHE", raising=False)
    assert cache_dir() == Path("data")
    monkeypatch.setenv("MIXLAB_CACHE", "/somewhere")
    assert cache_dir() == Path("/somewhere")


# ------------------------------------------------------------------ the README's demo table

# A demo table as `mixlab demo` prints it (the README's table at commit 6b96dda: DoGE's row is
# the one that did not match what `make demo` printed at that commit, 158.08).
README_DEMO_TABLE = """\
| method | avg test PPL | Δ PPL vs stratified | beats stratified | target loss | Δ target loss vs stratified | wall time / run (s) | time vs stratified | extra steps |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| **stratified** | 152.50 | baseline | – | 4.7261 | baseline | 33.7 | 1.00× | 0 |
| aioli | 158.05 | +5.55 (n=1) | 0/1 | 4.7690 | +0.0429 | 36.0 | 1.07× | 0 |
| doge | 154.30 | +1.80 (n=1) | 0/1 | 4.7059 | -0.0202 | 47.0 | 1.40× | 0 |
"""


def _readme(table: str) -> str:
    return (
        "# mixlab\n\nintro\n\n## The demo\n\nMeasured:\n\n<!-- demo-table:start -->\n\n"
        f"{table}\n<!-- demo-table:end -->\n\nThis table is runs/demo/table.md.\n"
    )


def _check_script():
    """benchmarks/check_readme_demo.py, imported from its file (benchmarks/ is no package)."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "check_readme_demo.py"
    spec = importlib.util.spec_from_file_location("check_readme_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_table_is_the_first_table_only():
    from mixlab.report.demo_table import main_table

    md = ("# T\n\n3 method(s).\n\n| a | b |\n| --- | ---: |\n| **x** | 1 |  \n| y | 2 |\n\n"
          "## Test perplexity per domain\n\n| c |\n| --- |\n| 9 |\n")
    assert main_table(md) == "| a | b |\n| --- | ---: |\n| **x** | 1 |\n| y | 2 |\n"


def test_demo_writes_the_table_it_prints(tmp_path, monkeypatch, capsys):
    """`mixlab demo` with its three stages faked: RUN/table.md is the first table of what it
    printed, byte for byte."""
    import argparse

    import mixlab.data.prepare as prepare_mod
    import mixlab.orchestrate.compare as compare_mod
    import mixlab.report.html as html_mod
    from mixlab.commands import demo

    printed = f"# mixlab demo\n\nfacts.\n\n{README_DEMO_TABLE}\n## Test perplexity per domain\n\n| x |\n"

    class Result:
        markdown = printed
        failed = ()

    class Report:
        html = tmp_path / "r.html"
        out = tmp_path
        markdown = tmp_path / "summary.md"

    monkeypatch.setattr(prepare_mod, "prepare", lambda *a, **k: None)
    monkeypatch.setattr(compare_mod, "compare", lambda *a, **k: Result())
    monkeypatch.setattr(html_mod, "build_report", lambda *a, **k: Report())
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = argparse.Namespace(print_config=False, overrides=[], out=str(out), seeds=1, jobs=1)
    assert demo.run(args) == 0
    assert (out / "table.md").read_text(encoding="utf-8") == README_DEMO_TABLE
    assert f"table: {(out / 'table.md').resolve()}" in capsys.readouterr().out


def test_same_table_up_to_timing_is_in_step():
    from mixlab.report.demo_table import readme_differences, readme_table

    ours = readme_table(_readme(README_DEMO_TABLE))
    assert ours == README_DEMO_TABLE
    # Another run of the same commit: only the wall times differ.
    rerun = README_DEMO_TABLE.replace("| 33.7 | 1.00× |", "| 35.1 | 1.00× |").replace(
        "| 47.0 | 1.40× |", "| 49.9 | 1.42× |")
    assert readme_differences(ours, rerun) == []
    assert readme_differences(ours, rerun, strict=True) == [
        "row 'stratified', column 'wall time / run (s)': README 33.7, run 35.1",
        "row 'doge', column 'wall time / run (s)': README 47.0, run 49.9",
        "row 'doge', column 'time vs stratified': README 1.40×, run 1.42×",
    ]


def test_a_changed_number_is_reported_by_row_and_column():
    from mixlab.report.demo_table import readme_differences

    run = README_DEMO_TABLE.replace("| doge | 154.30 | +1.80 (n=1) |", "| doge | 158.08 | +5.58 (n=1) |")
    assert readme_differences(README_DEMO_TABLE, run) == [
        "row 'doge', column 'avg test PPL': README 154.30, run 158.08",
        "row 'doge', column 'Δ PPL vs stratified': README +1.80 (n=1), run +5.58 (n=1)",
    ]


def test_other_columns_or_methods_are_reported():
    from mixlab.report.demo_table import readme_differences

    lines = README_DEMO_TABLE.splitlines()
    with_total = "\n".join(
        [lines[0] + " total steps |", lines[1] + " ---: |", *(ln + " 500 |" for ln in lines[2:])]
    ) + "\n"
    (diff,) = readme_differences(README_DEMO_TABLE, with_total)
    assert diff.startswith("the columns differ:") and "'total steps'" in diff
    no_doge = "\n".join(lines[:-1]) + "\n"
    assert readme_differences(README_DEMO_TABLE, no_doge) == [
        "the methods differ: README has ['stratified', 'aioli', 'doge'], the run has "
        "['stratified', 'aioli']."
    ]


def test_check_script_exit_codes_diff_and_write(tmp_path, capsys):
    check = _check_script()
    readme = tmp_path / "README.md"
    readme.write_text(_readme(README_DEMO_TABLE), encoding="utf-8")
    run = tmp_path / "demo"
    run.mkdir()
    (run / "table.md").write_text(README_DEMO_TABLE, encoding="utf-8")
    assert check.main([str(run), "--readme", str(readme)]) == 0

    new = README_DEMO_TABLE.replace("| doge | 154.30 |", "| doge | 158.08 |")
    (run / "table.md").write_text(new, encoding="utf-8")
    capsys.readouterr()
    assert check.main([str(run), "--readme", str(readme)]) == 1
    out = capsys.readouterr().out
    assert "row 'doge', column 'avg test PPL': README 154.30, run 158.08" in out
    assert "-| doge | 154.30 |" in out and "+| doge | 158.08 |" in out

    # --write puts the run's table between the markers and leaves the rest byte for byte.
    assert check.main([str(run), "--readme", str(readme), "--write"]) == 0
    assert readme.read_text(encoding="utf-8") == _readme(new)
    assert check.main([str(run), "--readme", str(readme), "--strict"]) == 0

    readme.write_text("# no markers\n", encoding="utf-8")
    assert check.main([str(run), "--readme", str(readme)]) == 2
    assert "demo-table:start" in capsys.readouterr().err
    assert check.main([str(tmp_path / "nowhere"), "--readme", str(readme)]) == 2


def test_repo_readme_table_has_the_demo_methods_and_columns(tmp_path, make_run):
    """The README's demo table lists stratified and every dynamic mixer (what `mixlab demo`
    runs), under the columns compare prints for a run with a target: a new mixer or a new
    column needs the table regenerated with `check_readme_demo.py RUN --write`."""
    from mixlab.report.demo_table import main_table, parse_table, readme_table
    from mixlab.report.runs import collect_runs
    from mixlab.report.table import build_comparison, to_markdown

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    head, rows = parse_table(readme_table(readme))
    mixer_class("stratified")
    assert [r[0].strip("*") for r in rows] == ["stratified", *sorted(
        n for n, c in MIXERS.items() if c.dynamic)]
    runs = [make_run(tmp_path / m, m, 0, {"a": 10.0}, target_loss=3.0) for m in ("stratified", "odm")]
    printed_head, _ = parse_table(main_table(to_markdown(build_comparison(collect_runs(runs)))))
    assert head == printed_head
