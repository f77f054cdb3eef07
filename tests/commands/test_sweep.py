"""``mixlab sweep`` on a tiny synthetic data dir, training in-process: the proxy runs, the fitted
mixtures, reuse and resume of finished runs, the final run's accounting, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.train.conftest import tiny_overrides

from mixlab.cli import main
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.errors import ConfigError
from mixlab.orchestrate.launch import inline_launcher
from mixlab.orchestrate.sweep import plan_sweep, sweep
from mixlab.report.runs import load_run
from mixlab.report.table import build_comparison, to_markdown

PROXY = ["train.steps=6", "eval.every=0", "train.log_every=2", "optim.warmup_steps=2"]


class Counting:
    """The in-process launcher, recording (run, resume) of every call."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, spec, resume, threads):
        self.calls.append((spec.mixer, resume))
        return inline_launcher(spec, resume, threads)


def _valid(weights: dict[str, float], domains=("a", "b", "c")) -> None:
    assert list(weights) == list(domains)
    w = np.array(list(weights.values()))
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return make_synthetic_datadir(root / "data", {"a": 40, "b": 40, "c": 10}, vocab_size=64)


def _plan(data, out, n, **kw):
    return plan_sweep(None, out, n, tiny_overrides(data), PROXY, **kw)


def test_sweep_fits_reuses_and_resumes(data, tmp_path):
    out = tmp_path / "sw"
    launch = Counting()
    res = sweep(_plan(data, out, 5), launcher=launch, jobs=1, poll_s=0, candidates=500, regressor="linear")
    assert [c[0] for c in launch.calls] == [f"mix00{i}" for i in range(5)]
    assert set(res["methods"]) == {"best", "dml", "regmix"} and res["method"] == "dml"
    for r in res["methods"].values():
        _valid(r["weights"])
    assert res["extra_steps"] == 5 * 6 and res["runs"] == 5
    assert "mixer.options.weights={" in res["set"]["fixed"]
    written = json.loads((out / "mixture.json").read_text())
    assert written["weights"] == res["weights"]
    table = json.loads((out / "sweep.json").read_text())
    assert table["finished_runs"] == 5 and set(table["runs"][0]["val_loss"]) == {"a", "b", "c"}
    assert (out / "sweep.csv").read_text().count("\n") == 6

    # The same sweep again: every run is reused, the result is the same.
    again = Counting()
    res2 = sweep(_plan(data, out, 5), launcher=again, jobs=1, poll_s=0, candidates=500, regressor="linear")
    assert again.calls == [] and res2["weights"] == res["weights"]
    # A larger sweep trains only the new mixture (the first five are the same mixtures).
    more = Counting()
    sweep(_plan(data, out, 6), launcher=more, jobs=1, poll_s=0, candidates=500, regressor="linear")
    assert more.calls == [("mix005", False)]
    # A run that lost its summary but has a checkpoint is resumed, not redone.
    (out / "runs" / "mix002" / "seed0" / "summary.json").unlink()
    resumed = Counting()
    sweep(_plan(data, out, 6), launcher=resumed, jobs=1, poll_s=0, candidates=500, regressor="linear")
    assert resumed.calls == [("mix002", True)]


def test_sweep_final_run_counts_the_proxy_steps(data, tmp_path):
    out = tmp_path / "sw"
    plan = plan_sweep(None, out, 4, [*tiny_overrides(data), "train.steps=8"], PROXY, mode="grid")
    res = sweep(plan, method="best", final=True, launcher=inline_launcher, jobs=1, poll_s=0,
                candidates=500)
    final = res["final"]
    assert final["steps"] == 8 and final["extra_steps"] == 4 * 6
    assert final["sweep"]["proxy_steps"] == 24 and final["mixer"] == "fixed"
    assert "dml" not in res["methods"] and any("dml skipped" in n for n in res["notes"])
    _valid(res["weights"])
    # Accounting is idempotent: running again does not add the proxy steps twice.
    res2 = sweep(plan, method="best", final=True, launcher=inline_launcher, jobs=1, poll_s=0,
                 candidates=500)
    assert res2["final"]["extra_steps"] == 24
    # The compare table states what each result cost: a proxy run vs the sweep's final run.
    runs = [load_run(out / "runs" / "mix000" / "seed0"), load_run(out / "runs" / "final" / "seed0")]
    runs[0].label, runs[1].label = "stratified", "sweep-best"
    cmp = build_comparison(runs)
    assert [(r.steps, r.extra_steps, r.total_steps) for r in cmp.runs] == [(6, 0, 6), (8, 24, 32)]
    assert "| total steps |" in to_markdown(cmp) and "| 24 | 32 |" in to_markdown(cmp)


def test_too_few_runs_and_bad_options_are_clear_errors(data, tmp_path, capsys):
    plan = _plan(data, tmp_path / "sw", 3)
    with pytest.raises(ConfigError, match="at least 5 runs"):
        sweep(plan, launcher=inline_launcher, jobs=1, poll_s=0)
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["finished_runs"] == 3
    with pytest.raises(ConfigError, match="needs runs with a target set"):
        sweep(plan, method="best", objective="target", launcher=inline_launcher, poll_s=0)
    with pytest.raises(ConfigError, match="neither 'avg' nor a domain"):
        sweep(plan, method="best", objective="zz", launcher=inline_launcher, poll_s=0)
    args = ["sweep", "--n", "4", "--out", str(tmp_path / "x"), "--prior", "{a = 1}",
            *[x for o in tiny_overrides(data) for x in ("--set", o)]]  # fmt: skip
    assert main(args) == 2
    assert "missing domain(s) ['b', 'c']" in capsys.readouterr().err
