"""benchmarks/bench_suite.py: its statistics against hand-computed numbers, the derived data
dirs (unlearnable, duplicate, constrained domains) and the run configs it hands to compare."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Statistics


def test_mean_se_and_paired(suite):
    # [1, 2, 3, 4]: mean 2.5, sample variance 5/3, SE sqrt(5/3) / 2.
    mu, se = suite.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mu == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert suite.mean_se([7.0]) == (7.0, 0.0)
    # Only seeds both have, in seed order.
    assert suite.paired({0: 5.0, 1: 4.0, 3: 1.0}, {1: 1.0, 0: 2.0, 2: 9.0}) == [3.0, 3.0]


def test_share_of_gain_delta_method(suite):
    # a = method's paired Δ, b = best fixed's: mean a = -0.2, mean b = -0.8/3, r = 0.75;
    # var a = 0.01, var b = 0.04/3, cov = 0.01;
    # var r = (0.01 - 2 * 0.75 * 0.01 + 0.5625 * 0.04/3) / (3 * (0.8/3)^2) = 0.0025 / (0.64/3).
    r, se = suite.share_of_gain([-0.1, -0.2, -0.3], [-0.2, -0.2, -0.4])
    assert r == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(0.0075 / 0.64))
    # The best fixed mixture itself captures all of its gain, with no uncertainty.
    assert suite.share_of_gain([-0.1, -0.3, -0.2], [-0.1, -0.3, -0.2]) == pytest.approx((1.0, 0.0))
    assert all(math.isnan(x) for x in suite.share_of_gain([0.1, 0.2], [0.1, -0.1]))
    with pytest.raises(ValueError):
        suite.share_of_gain([0.1], [0.1, 0.2])


def test_window_se_iid_and_batch_means(suite):
    # x: var 2 over 2 windows -> 1; y: [2, 2, 2, 6] var 4 over 4 -> 1; weights 1/2 each:
    # SE = sqrt(0.25 * 1 + 0.25 * 1).
    per = {"x": np.array([1.0, 3.0]), "y": np.array([2.0, 2.0, 2.0, 6.0])}
    assert suite.window_se(per, {"x": 0.5, "y": 0.5}) == pytest.approx(math.sqrt(0.5))
    # A zero weight leaves a domain out.
    assert suite.window_se(per, {"x": 1.0, "y": 0.0}) == pytest.approx(1.0)
    # Blocks of 2: [1, 3, 5, 7, 9] -> means [2, 6] (9 dropped), var 8 over 2 blocks -> SE 2.
    assert suite.window_se({"x": np.array([1.0, 3, 5, 7, 9])}, {"x": 1.0}, block=2) == pytest.approx(2.0)


def test_weighted_loss_last_fraction_and_verdict(suite):
    assert suite.weighted_loss({"a": 2.0, "b": 4.0, "n": 7.6}, {"a": 0.5, "b": 0.5, "n": 0.0}) == 3.0
    # Step 80 lies between (50, 6) and (100, 5): 5.4; change 5 - 5.4; whole drop 5 - 10.
    change, share = suite.last_fraction_change([(0, 10.0), (50, 6.0), (100, 5.0)])
    assert change == pytest.approx(-0.4)
    assert share == pytest.approx(0.08)
    assert suite.verdict(-0.1, 0.04) == "reproduced"
    assert suite.verdict(-0.1, 0.06) == "within noise"
    assert suite.verdict(0.1, 0.01) == "not reproduced here"
    assert suite.verdict(0.1, 0.01, want_negative=False) == "reproduced"
    assert suite.verdict(float("nan"), 0.1) == "within noise"


def test_best_fixed_row_is_chosen_on_validation_not_test(suite):
    runs = {
        "best-fixed": {0: {"val": 5.0, "test": 4.0}, 1: {"val": 5.2, "test": 4.0}},      # val mean 5.1
        "report-uniform": {0: {"val": 5.0, "test": 9.0}, 1: {"val": 5.0, "test": 9.0}},  # val mean 5.0
        "aioli": {0: {"val": 1.0, "test": 1.0}, 1: {"val": 1.0, "test": 1.0}},            # not a fixed row
    }
    assert suite.best_fixed_row(runs) == "report-uniform"
    # One seed is not a mean: such a row is not a candidate.
    assert suite.best_fixed_row({**runs, "report-uniform": {0: {"val": 1.0}}}) == "best-fixed"
    assert suite.best_fixed_row({"aioli": runs["aioli"]}) is None
    # Sampling by size is a fixed mixture: a candidate where it ran.
    natural = {0: {"val": 4.9, "test": 9.0}, 1: {"val": 4.9, "test": 9.0}}
    assert suite.best_fixed_row({**runs, "natural": natural}) == "natural"


# ---------------------------------------------------------------------------------------------
# Data


def test_random_documents_are_uniform_noise(suite):
    docs = suite.random_documents(10_000, 99, vocab=64, eos=5, seed=(1, 2))
    assert len(docs) == 100  # ceil(10000 / (99 + 1))
    assert all(len(d) == 100 and d[-1] == 5 and 5 not in d[:-1] for d in docs)
    ids = np.concatenate([d[:-1] for d in docs])
    assert ids.min() >= 0 and ids.max() < 64
    counts = np.bincount(ids, minlength=64)
    assert counts[5] == 0
    # 9,900 draws over 63 ids: ~157 each; a uniform draw stays well inside [100, 220].
    assert counts[np.arange(64) != 5].min() > 100 and counts.max() < 220
    again = suite.random_documents(10_000, 99, vocab=64, eos=5, seed=(1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(docs, again))


def test_split_alternate_and_take_tokens(suite):
    docs = [np.full(n, n) for n in (3, 5, 7, 9, 11)]
    a, b = suite.split_alternate(docs)
    assert [len(d) for d in a] == [3, 7, 11] and [len(d) for d in b] == [5, 9]
    kept = suite.take_tokens(docs, 12, seed=(0,))
    lengths = [len(d) for d in kept]
    assert sum(lengths) >= 12
    assert sum(lengths) - max(lengths) < 12  # stops at the first document that reaches it
    assert lengths == sorted(lengths)  # original order kept
    assert len(suite.take_tokens(docs, 10**6, seed=(0,))) == 5


def _tokens(data, domain, split):
    return data.split(domain, split).n_tokens


def test_derived_data_dirs(suite, tiny_data, tmp_path):
    from mixlab.data.format import DataDir

    base = DataDir.open(tiny_data)
    noise = {"train": 500, "val": 120, "test": 120}
    unl = suite.write_derived(base, tmp_path / "unl", {"noise": noise},
                              lambda b: suite.unlearnable_domains(b, noise, 49))
    assert unl.domains == [*base.domains, "noise"]
    for s in ("train", "val", "test"):
        assert _tokens(unl, "noise", s) == 50 * -(-noise[s] // 50)
        for d in base.domains:  # the real domains are copied unchanged
            assert np.array_equal(unl.split(d, s).document(0), base.split(d, s).document(0))
            assert _tokens(unl, d, s) == _tokens(base, d, s)

    dup = suite.write_derived(base, tmp_path / "dup", {"duplicate": "a"},
                              lambda b: suite.duplicate_domains(b, "a"))
    assert dup.domains == ["a_a", "a_b", "b", "c"]
    for s in ("train", "val", "test"):
        assert _tokens(dup, "a_a", s) + _tokens(dup, "a_b", s) == _tokens(base, "a", s)
        assert dup.split("a_a", s).n_docs == -(-base.split("a", s).n_docs // 2)
    assert np.array_equal(dup.split("a_b", "train").document(0), base.split("a", "train").document(1))

    con = suite.write_derived(base, tmp_path / "con", {"small": "b", "tokens": 300},
                              lambda b: suite.constrained_domains(b, "b", 300))
    assert 300 <= _tokens(con, "b", "train") < _tokens(base, "b", "train")
    assert _tokens(con, "b", "test") == _tokens(base, "b", "test")

    # Same recipe: reused as it is (not rebuilt); another recipe: rebuilt.
    stamp = (tmp_path / "con" / "manifest.json").stat().st_mtime_ns
    suite.write_derived(base, tmp_path / "con", {"small": "b", "tokens": 300},
                        lambda b: pytest.fail("rebuilt a current data dir"))
    assert (tmp_path / "con" / "manifest.json").stat().st_mtime_ns == stamp
    con2 = suite.write_derived(base, tmp_path / "con", {"small": "b", "tokens": 600},
                               lambda b: suite.constrained_domains(b, "b", 600))
    assert _tokens(con2, "b", "train") >= 600


# ---------------------------------------------------------------------------------------------
# Run configs


def test_row_configs_and_threads(suite, tiny_data, tmp_path):
    from mixlab.orchestrate.compare import plan_compare
    from mixlab.orchestrate.launch import parallelism

    general = suite.base_raw(300, Path(tiny_data), ["a", "b", "c"])
    setting = suite.Setting("t", "t", ["a", "b", "c"], {"a": 0.5, "b": 0.5, "c": 0.0},
                            target={"domain": "c", "docs": 4, "probe_fraction": 0.5})
    rows = {r.name: r for r in suite.ROWS}

    frozen = plan_compare(None, tmp_path / "f", mixers=["aioli"], seeds=2,
                          raw=suite.row_raw(rows["aioli-frozen"], setting, general, 4.0))
    opts = frozen.specs[0].config["mixer"]["options"]
    assert opts["eta"] == 0.0 and opts["round_steps"] == 100 and opts["lp_steps"] == 2
    assert [s.seed for s in frozen.specs] == [0, 1]
    cfg = frozen.specs[0].config
    assert cfg["train"]["threads"] == 1 and cfg["train"]["steps"] == 300
    assert "max_epochs" not in cfg["data"] or cfg["data"]["max_epochs"] is None
    assert not cfg["target"]["domain"]

    budget = plan_compare(None, tmp_path / "b", mixers=["dga"], seeds=1,
                          raw=suite.row_raw(rows["dga+budget"], setting, general, 4.0))
    cfg = budget.specs[0].config
    assert cfg["data"]["max_epochs"] == 4.0 and cfg["data"]["budget_pace"] == "even"
    assert cfg["target"]["domain"] == "c" and cfg["mixer"]["options"]["update_every"] == 10

    fixed = plan_compare(None, tmp_path / "x", mixers=["fixed"], seeds=1,
                         raw=suite.row_raw(rows["best-fixed"], setting, general, 4.0,
                                           fixed={"a": 0.5, "b": 0.25, "c": 0.25}))
    assert fixed.specs[0].config["mixer"]["options"]["weights"] == {"a": 0.5, "b": 0.25, "c": 0.25}

    # compare --jobs 2 on 2 cores keeps the configured one thread per run.
    assert parallelism(2, 10, cores=2, threads=1) == (2, 1)


def test_every_setting_reports_a_distribution_over_its_own_domains(suite):
    for key, s in suite.settings(10_000).items():
        assert set(s.report) == set(s.domains), key
        assert sum(s.report.values()) == pytest.approx(1.0), key
    assert suite.settings(10_000)["unlearnable"].report["noise"] == 0.0
