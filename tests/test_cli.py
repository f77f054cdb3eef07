from __future__ import annotations

import json

import pytest

from mixlab.cli import main


def test_print_config_and_list_mixers(capsys):
    assert main(["train", "--print-config", "--set", "mixer.name=temperature"]) == 0
    out = capsys.readouterr().out
    assert "[optim]" in out and "# Peak learning rate of AdamW." in out
    assert "# options of mixer 'temperature'" in out and "tau = 2.0" in out
    assert main(["train", "--list-mixers"]) == 0
    out = capsys.readouterr().out
    assert "stratified" in out and "static" in out


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    assert main(["train", "--set", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "mixlab train: error: unknown config key 'train.stpes'. Did you mean 'steps'?"
    assert main(["train", "--set", f"data.dir='{tmp_path}'"]) == 2
    assert "is not a prepared data dir" in capsys.readouterr().err
    assert main(["train", "--set", "mixer.name=stratifed"]) == 2
    assert "unknown mixer 'stratifed'. Did you mean 'stratified'?" in capsys.readouterr().err


def test_train_cli_end_to_end(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--set", f"data.dir='{tiny_data}'", "--set", "data.seq_len=16",
            "--set", "model.d_model=32", "--set", "model.n_layer=1", "--set", "train.steps=6",
            "--set", "train.batch_size=4", "--set", "train.progress=false", "--set", "eval.windows=4",
            "--set", "eval.test_windows=4"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed["avg_test_ppl"] == summary["test"]["avg_ppl"]


# ---------------------------------------------------------------------------------------------
# Issue 15, item 6: --print-config is a config file; `mixlab train` counts the reference's steps


def _all_mixers() -> list[str]:
    import mixlab.mixers  # noqa: F401  (registers every mixer)
    from mixlab.mixers.base import MIXERS

    return sorted(MIXERS)


@pytest.mark.parametrize(
    "sets",
    [
        ["mixer.name=aioli"],  # the reported case: `options = {}` and a [mixer.options] table
        ["mixer.name=aioli", "mixer.options.eta=0.5", "mixer.options.prior={'x.y' = 2.0}"],
        ["mixer.name=fixed", 'mixer.options.weights={"a b" = 0.25, "c.d" = 0.75}'],
        *[[f"mixer.name={name}"] for name in _all_mixers()],
    ],
)
def test_print_config_is_valid_toml_that_round_trips(sets, tmp_path, capsys):
    """The printed config parses as TOML, loads to the config it was printed from (options left
    at their defaults stay unset), and printing it again gives the same text byte for byte."""
    import tomllib

    from mixlab.train.config import load_config

    argv = ["train", "--print-config"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tomllib.loads(printed)  # raises on "Cannot declare ('mixer', 'options') twice"
    path = tmp_path / "printed.toml"
    path.write_text(printed, encoding="utf-8")
    assert load_config(path) == load_config(None, sets)
    assert main(["train", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert printed.count("[mixer.options]") == 1 and "\noptions = {" not in printed


def test_train_counts_the_reference_runs_steps_in_summary_json(tiny_data, tmp_path, capsys):
    """A DoReMi run reads a reference model trained outside it: its summary.json counts the
    reference's steps (5, set here) as extra steps, and the comparison table shows the very
    number the file holds (it used to add them on its own while the file said 0)."""
    from tests.train.conftest import tiny_overrides

    from mixlab.report.runs import collect_runs
    from mixlab.report.table import build_comparison

    def train(out, *sets, flags=()):
        argv = ["train", "--out", str(out), *flags]
        for s in [*tiny_overrides(tiny_data), "train.steps=5", "eval.every=5", *sets]:
            argv += ["--set", s]
        assert main(argv) == 0
        capsys.readouterr()
        return json.loads((out / "summary.json").read_text())

    ref = tmp_path / "ref"
    assert train(ref)["extra_steps"] == 0
    summary = train(tmp_path / "dr", "mixer.name=doremi", f"mixer.reference='{ref}'")
    assert summary["steps"] == 5 and summary["extra_steps"] == 5
    assert summary["input_runs"] == {
        "own_extra_steps": 0, "runs": {"mixer.reference": {"run": str(ref), "steps": 5}},
    }  # fmt: skip
    # --resume of the finished run changes nothing (the count is made once).
    before = (tmp_path / "dr" / "summary.json").read_bytes()
    train(tmp_path / "dr", "mixer.name=doremi", f"mixer.reference='{ref}'", flags=["--resume"])
    assert (tmp_path / "dr" / "summary.json").read_bytes() == before
    cmp = build_comparison(collect_runs([ref, tmp_path / "dr"]))
    assert [(r.method, r.extra_steps, r.total_steps) for r in cmp.runs] == [
        ("stratified", 0, 5), ("doremi", 5, 10),
    ]  # fmt: skip
