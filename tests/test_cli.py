from __future__ import annotations

import json

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
