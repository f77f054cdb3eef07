"""mixlab compare: the table's numbers, the plan, and the scheduling of runs (with a fake
launcher), plus one real end-to-end comparison on a tiny synthetic data dir."""

from __future__ import annotations

import csv
import io
import json
import math
import signal
from pathlib import Path

import pytest

from mixlab.errors import ConfigError, MixlabError
from mixlab.report.compare import (
    CompareConfig,
    Progress,
    RunSpec,
    StepTail,
    compare,
    parallelism,
    plan_compare,
    run_all,
    train_command,
    write_plan,
)
from mixlab.report.runs import collect_runs
from mixlab.report.table import build_comparison, to_csv, to_markdown

# ---------------------------------------------------------------------------------------------
# The table

PPL = {
    ("stratified", 0): {"code": 10.0, "legal": 20.0, "news": 30.0},  # avg 20
    ("stratified", 1): {"code": 12.0, "legal": 18.0, "news": 33.0},  # avg 21
    ("aioli", 0): {"code": 9.0, "legal": 19.0, "news": 29.0},  # avg 19   -> diff -1
    ("aioli", 1): {"code": 12.0, "legal": 18.5, "news": 34.0},  # avg 21.5 -> diff +0.5
    ("odm", 0): {"code": 8.0, "legal": 18.0, "news": 28.0},  # avg 18   -> diff -2
    ("odm", 1): {"code": 10.0, "legal": 16.0, "news": 31.0},  # avg 19   -> diff -2
}
WALL = {("stratified", 0): 10.0, ("stratified", 1): 20.0, ("aioli", 0): 15.0, ("aioli", 1): 20.0}


@pytest.fixture
def three_methods(tmp_path, make_run):
    root = tmp_path / "cmp"
    for (mixer, seed), ppl in PPL.items():
        make_run(root / "runs" / mixer / f"seed{seed}", mixer, seed, ppl,
                 wall_time_s=WALL.get((mixer, seed), 10.0),
                 extra_steps=100 if mixer == "odm" else 0)  # fmt: skip
    return root


def test_paired_differences_mean_std_and_wins(three_methods):
    runs = collect_runs([three_methods])
    cmp = build_comparison(runs, order=["stratified", "aioli", "odm"])
    assert cmp.baseline == "stratified"
    assert cmp.domains == ["code", "legal", "news"]
    assert [m.method for m in cmp.methods] == ["stratified", "aioli", "odm"]
    strat, aioli, odm = cmp.methods

    assert strat.avg_ppl.mean == 20.5 and strat.diffs == {0: 0.0, 1: 0.0} and strat.wins == 0
    assert aioli.diffs == {0: -1.0, 1: 0.5}
    assert aioli.diff.mean == -0.25
    assert aioli.diff.std == pytest.approx(math.sqrt(1.125))
    assert aioli.wins == 1 and aioli.diff.n == 2
    assert aioli.within_noise is True  # 0.25 <= 2 * 1.0607 / sqrt(2)
    assert odm.diffs == {0: -2.0, 1: -2.0}
    assert odm.diff.mean == -2.0 and odm.diff.std == 0.0 and odm.wins == 2
    assert odm.within_noise is False
    assert aioli.domain_ppl["news"].mean == 31.5
    assert aioli.time_ratio.mean == pytest.approx((1.5 + 1.0) / 2)
    assert odm.extra_steps.mean == 100.0
    assert not cmp.has_target


def test_markdown_rows(three_methods):
    cmp = build_comparison(collect_runs([three_methods]), order=["stratified", "aioli", "odm"])
    md = to_markdown(cmp)
    assert "| **stratified** | 20.50 ± 0.71 | baseline | – | 15.0 ± 7.1 | 1.00× | 0 |" in md
    assert "| aioli | 20.25 ± 1.77 | -0.25 ± 1.06 ~ | 1/2 | 17.5 ± 3.5 | 1.25× | 0 |" in md
    assert "| odm | 18.50 ± 0.71 | -2.00 ± 0.00 | 2/2 | 10.0 ± 0.0 | 0.75× | 100 |" in md
    # Per-domain table and per-seed paired differences.
    assert "| aioli | 10.50 ± 2.12 | 18.75 ± 0.35 | 31.50 ± 3.54 |" in md
    assert "| aioli | -1.00 | 0.50 | -0.25 ± 1.06 | yes |" in md
    assert "| odm | -2.00 | -2.00 | -2.00 ± 0.00 | no |" in md
    assert "2·std/√n" in md and "differences are from stratified" in md
    assert "target loss" not in md


def test_csv_rows(three_methods):
    cmp = build_comparison(collect_runs([three_methods]), order=["stratified", "aioli", "odm"])
    rows = list(csv.DictReader(io.StringIO(to_csv(cmp))))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("stratified", "0"), ("stratified", "1"), ("aioli", "0"), ("aioli", "1"),
        ("odm", "0"), ("odm", "1"),
        ("stratified", "mean"), ("stratified", "std"), ("aioli", "mean"), ("aioli", "std"),
        ("odm", "mean"), ("odm", "std"),
    ]  # fmt: skip
    by = {(r["method"], r["seed"]): r for r in rows}
    assert float(by["aioli", "1"]["diff_avg_ppl"]) == 0.5
    assert float(by["aioli", "1"]["avg_test_ppl"]) == 21.5
    assert float(by["aioli", "1"]["ppl_legal"]) == 18.5
    assert float(by["aioli", "0"]["time_ratio"]) == 1.5
    assert by["aioli", "mean"]["wins"] == "1" and by["aioli", "mean"]["n_paired"] == "2"
    assert by["aioli", "mean"]["within_noise"] == "true"
    assert by["odm", "mean"]["within_noise"] == "false"
    assert float(by["odm", "mean"]["diff_avg_ppl"]) == -2.0
    assert float(by["aioli", "std"]["diff_avg_ppl"]) == pytest.approx(math.sqrt(1.125))
    assert by["odm", "0"]["extra_steps"] == "100"
    assert {r["baseline"] for r in rows} == {"stratified"}


def test_without_stratified_the_first_method_is_the_baseline(tmp_path, make_run):
    make_run(tmp_path / "odm0", "odm", 0, {"a": 10.0, "b": 20.0})
    make_run(tmp_path / "aioli0", "aioli", 0, {"a": 9.0, "b": 20.0})
    cmp = build_comparison(collect_runs([tmp_path / "odm0", tmp_path / "aioli0"]))
    assert cmp.baseline == "odm"
    assert cmp.methods[1].diffs == {0: -0.5}
    md = to_markdown(cmp)
    assert (
        "stratified is not among the methods, so differences are from the first method, odm" in md
    )
    assert "| aioli | 14.50 | -0.50 (n=1) | 1/1 |" in md


def test_unpaired_seed_and_target_loss(tmp_path, make_run):
    make_run(tmp_path / "s0", "stratified", 0, {"a": 10.0}, target_loss=3.0)
    make_run(tmp_path / "x0", "odm", 0, {"a": 11.0}, target_loss=2.5)
    make_run(tmp_path / "x1", "odm", 1, {"a": 8.0}, target_loss=2.0)
    cmp = build_comparison(collect_runs([tmp_path / p for p in ("s0", "x0", "x1")]))
    odm = cmp.methods[1]
    assert odm.diffs == {0: 1.0} and odm.diff.n == 1 and odm.wins == 0
    assert odm.avg_ppl.mean == 9.5 and odm.target_diff.mean == -0.5
    assert cmp.has_target
    md = to_markdown(cmp)
    assert "| odm | 9.50 ± 2.12 | +1.00 (n=1) | 0/1 | 2.2500 ± 0.3536 | -0.5000 |" in md


def test_reference_run_steps_count_as_extra_steps(tmp_path, make_run):
    ref = make_run(tmp_path / "s0", "stratified", 0, {"a": 10.0}, steps=40)
    make_run(tmp_path / "d0", "doremi", 0, {"a": 9.0}, steps=40, extra_steps=5,
             overrides=[f"mixer.reference={ref}"])  # fmt: skip
    cmp = build_comparison(collect_runs([tmp_path / "s0", tmp_path / "d0"]))
    assert [r.extra_steps for r in cmp.runs] == [0, 45]


def test_unfinished_runs_are_left_out_of_the_table(tmp_path, make_run):
    make_run(tmp_path / "s0", "stratified", 0, {"a": 10.0})
    make_run(tmp_path / "x0", "odm", 0, {"a": 9.0}, finished=False)
    cmp = build_comparison(collect_runs([tmp_path / "s0", tmp_path / "x0"]))
    assert [m.method for m in cmp.methods] == ["stratified"]


# ---------------------------------------------------------------------------------------------
# The plan


def _raw(data_dir: Path, **extra) -> dict:
    raw = {
        "data": {"dir": str(data_dir), "seq_len": 16},
        "model": {"d_model": 16, "n_layer": 1, "n_head": 2},
        "train": {"steps": 10, "batch_size": 4, "seed": 3, "log_every": 2},
        "eval": {"every": 5, "windows": 4, "signal_windows": 2, "test_windows": 4,
                 "batch_size": 16},
    }  # fmt: skip
    raw.update(extra)
    return raw


def test_plan_resolves_one_config_per_run(tmp_path):
    raw = _raw(
        tmp_path / "data",
        mixer={"name": "temperature", "options": {"tau": 3.0}},
        mixers={"fixed": {"options": {"weights": {"a": 0.5, "b": 0.5}}}},
        compare={"mixers": ["temperature", "stratified", "fixed"], "seeds": 2},
    )
    plan = plan_compare(None, tmp_path / "out", raw=raw)
    assert plan.mixers == ["stratified", "temperature", "fixed"]
    assert plan.seeds == [3, 4] and plan.baseline == "stratified"
    assert [s.key for s in plan.specs] == [
        "stratified/seed3", "stratified/seed4", "temperature/seed3", "temperature/seed4",
        "fixed/seed3", "fixed/seed4",
    ]  # fmt: skip
    by = {s.key: s for s in plan.specs}
    t4 = by["temperature/seed4"]
    assert t4.config["mixer"] == {"name": "temperature", "apply": "sample", "reference": "",
                                  "options": {"tau": 3.0}}  # fmt: skip
    assert t4.config["train"]["seed"] == 4 and t4.steps == 10
    assert by["stratified/seed3"].config["mixer"]["options"] == {}
    assert by["fixed/seed3"].config["mixer"]["options"] == {"weights": {"a": 0.5, "b": 0.5}}
    assert t4.config["data"]["dir"] == str((tmp_path / "data").resolve())
    assert t4.run_dir == (tmp_path / "out" / "runs" / "temperature" / "seed4").resolve()
    assert "compare" not in t4.config and "mixers" not in t4.config

    write_plan(plan)
    manifest = json.loads((plan.out / "compare.json").read_text())
    assert manifest["mixers"] == plan.mixers and manifest["seeds"] == [3, 4]
    assert manifest["runs"][2] == {"mixer": "temperature", "seed": 3,
                                   "dir": "runs/temperature/seed3"}  # fmt: skip
    from mixlab.config import load_toml

    assert load_toml(t4.config_path) == t4.config
    cmd = train_command(t4, resume=True, threads=2)
    assert cmd[1:5] == ["-m", "mixlab", "train", str(t4.config_path)]
    assert cmd[5:] == ["--out", str(t4.run_dir), "--set", "train.threads=2",
                       "--set", "train.progress=false", "--resume"]  # fmt: skip


def test_plan_reference_to_a_compared_method(tmp_path):
    raw = _raw(tmp_path / "data", mixer={"apply": "loss"},
               mixers={"natural": {"reference": "stratified"}})  # fmt: skip
    plan = plan_compare(None, tmp_path / "out", mixers=["natural", "stratified"], seeds=2,
                        raw=raw)  # fmt: skip
    by = {s.key: s for s in plan.specs}
    n4 = by["natural/seed4"]
    assert n4.needs == ["stratified/seed4"]
    assert n4.config["mixer"]["reference"] == str(by["stratified/seed4"].run_dir)
    assert n4.config["mixer"]["apply"] == "loss"  # the shared [mixer] field applies to all
    assert by["stratified/seed3"].needs == [] and by["stratified/seed3"].config["mixer"][
        "reference"] == ""  # fmt: skip


def test_plan_cli_arguments_and_overrides_win(tmp_path):
    raw = _raw(
        tmp_path / "data",
        compare={"mixers": ["temperature"], "seeds": 3},
        mixers={"temperature": {"options": {"tau": 2.0}}},
    )  # kept for another comparison
    plan = plan_compare(None, tmp_path / "out", overrides=["train.steps=7"],
                        mixers=["natural", "stratified"], seeds=1, raw=raw)  # fmt: skip
    assert plan.mixers == ["stratified", "natural"] and plan.seeds == [3]
    assert all(s.steps == 7 for s in plan.specs)


@pytest.mark.parametrize(
    ("extra", "overrides", "message"),
    [
        ({"mixers": {"natrual": {}}}, [], "unknown mixer 'natrual'. Did you mean 'natural'?"),
        (
            {},
            ["mixers.temperature.options.tauu=2"],
            "unknown config key 'mixers.temperature.options.tauu'",
        ),
        (
            {},
            ["mixers.temperature.tau=2"],
            "mixers.temperature.tau is an option of temperature: put it under "
            "[mixers.temperature.options]",
        ),
        ({}, ["mixers.temperature.apply=weird"], "mixers.temperature.apply: 'weird' is not one"),
        ({}, ["mixers.temperature.reference=temperature"], "names temperature itself"),
        (
            {},
            ["mixers.temperature.reference=natural"],
            "'natural' is a method that is not compared",
        ),
        ({"compare": {"mixers": ["stratified", "nope"]}}, [], "unknown mixer 'nope'"),
        ({"compare": {"mixers": []}}, [], "no method to compare"),
        ({"compare": {"mixers": ["stratified"], "seeds": 0}}, [], "compare.seeds must be >= 1"),
        ({"train": {"steps": 0}}, [], "train.steps must be >= 1"),
    ],
)
def test_plan_errors(tmp_path, extra, overrides, message):
    raw = _raw(tmp_path / "data")
    raw.setdefault("compare", {"mixers": ["stratified", "temperature"]})
    raw.update(extra)
    with pytest.raises(ConfigError) as exc:
        plan_compare(None, tmp_path / "out", overrides=overrides, raw=raw)
    assert message in str(exc.value)


def test_compare_config_rejects_duplicates():
    with pytest.raises(ConfigError, match="more than once"):
        CompareConfig(mixers=["a", "a"])


def test_parallelism():
    assert parallelism(None, 10, cores=2) == (2, 1)
    assert parallelism(8, 10, cores=2) == (2, 1)
    assert parallelism(1, 10, cores=4) == (1, 4)
    assert parallelism(None, 1, cores=4) == (1, 4)  # one run left: it gets every core
    assert parallelism(3, 10, cores=8) == (3, 2)


def test_step_tail_reads_incrementally(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = StepTail(path)
    assert tail.poll() == 0
    path.write_text('{"kind": "train", "step": 10}\n{"kind": "eval", "st')
    assert tail.poll() == 10
    with path.open("a") as fh:
        fh.write('ep": 20}\n{"kind": "train", "step": 30}\n')
    assert tail.poll() == 30


# ---------------------------------------------------------------------------------------------
# Scheduling, with a fake launcher that "trains" by writing the run dir


class FakeProc:
    def __init__(self, spec: RunSpec, ticks: int, rc: int, write, interrupt: bool = False):
        self.spec, self.ticks, self.rc, self.write = spec, ticks, rc, write
        self.interrupt = interrupt
        self.signals: list[int] = []

    def poll(self):
        if self.interrupt:
            raise KeyboardInterrupt
        if self.signals:
            return -2
        if self.ticks > 0:
            self.ticks -= 1
            return None
        if self.rc == 0:
            self.write(self.spec)
        return self.rc

    def wait(self, timeout=None):
        return -2

    def send_signal(self, sig):
        self.signals.append(sig)

    def kill(self):
        self.signals.append(signal.SIGKILL)


class FakeLauncher:
    def __init__(self, make_run, fail=(), interrupt=(), ticks=2):
        self.make_run = make_run
        self.fail, self.interrupt, self.ticks = set(fail), set(interrupt), ticks
        self.calls: list[tuple[str, bool, int]] = []
        self.procs: dict[str, FakeProc] = {}
        self.existed: dict[str, bool] = {}
        self.live = 0
        self.max_live = 0

    def finish(self, spec: RunSpec) -> None:
        self.live -= 1
        cfg = json.loads(json.dumps(spec.config))
        cfg["train"]["threads"] = 1  # differs from the plan: must not matter
        self.make_run(spec.run_dir, spec.mixer, spec.seed, {"a": 10.0 + spec.seed, "b": 20.0},
                      steps=spec.steps, config=cfg)  # fmt: skip

    def __call__(self, spec: RunSpec, resume: bool, threads: int) -> FakeProc:
        self.calls.append((spec.key, resume, threads))
        self.existed[spec.key] = spec.run_dir.exists()
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        rc = 1 if spec.key in self.fail else 0
        proc = FakeProc(spec, self.ticks, rc, self.finish, interrupt=spec.key in self.interrupt)
        if rc:
            proc.write = lambda s: None
            self.live -= 1
        self.procs[spec.key] = proc
        return proc


@pytest.fixture
def plan4(tmp_path):
    raw = _raw(tmp_path / "data", compare={"mixers": ["stratified", "natural"], "seeds": 2})
    return plan_compare(None, tmp_path / "out", raw=raw)


def test_half_finished_compare_resumes_without_redoing_finished_runs(plan4, make_run):
    by = {s.key: s for s in plan4.specs}
    # stratified/seed3: finished.  natural/seed3: checkpointed, half-way.
    # stratified/seed4: died before its first checkpoint.  natural/seed4: never started.
    s3 = by["stratified/seed3"]
    make_run(s3.run_dir, "stratified", 3, {"a": 1.0, "b": 2.0}, steps=10, config=s3.config)
    n3 = by["natural/seed3"]
    make_run(n3.run_dir, "natural", 3, None, steps=10, config=n3.config, finished=False)
    (n3.run_dir / "checkpoints" / "step-000005").mkdir(parents=True)
    s4 = by["stratified/seed4"]
    make_run(s4.run_dir, "stratified", 4, None, steps=10, config=s4.config, finished=False)

    launcher = FakeLauncher(make_run)
    out = io.StringIO()
    outcome = run_all(plan4.specs, jobs=4, launcher=launcher, poll_s=0, cores=2,
                      progress=Progress(stream=out, every_s=0))  # fmt: skip
    assert outcome == {
        "stratified/seed3": "reused",
        "natural/seed3": "finished",
        "stratified/seed4": "finished",
        "natural/seed4": "finished",
    }
    assert sorted(launcher.calls) == [
        ("natural/seed3", True, 1), ("natural/seed4", False, 1), ("stratified/seed4", False, 1),
    ]  # fmt: skip
    assert launcher.max_live == 2
    assert launcher.existed == {
        "natural/seed3": True,
        "natural/seed4": False,
        "stratified/seed4": False,
    }  # the dead run's dir was cleared
    log = out.getvalue()
    assert "reusing 1 finished run(s): stratified/seed3" in log
    assert "resumed natural/seed3" in log and "finished natural/seed4" in log

    # A second pass has nothing left to do.
    again = FakeLauncher(make_run)
    outcome = run_all(plan4.specs, launcher=again, poll_s=0, cores=2)
    assert set(outcome.values()) == {"reused"} and again.calls == []


def test_run_made_with_another_config_is_an_error_unless_forced(plan4, make_run):
    s3 = plan4.specs[0]
    cfg = json.loads(json.dumps(s3.config))
    cfg["train"]["steps"] = 99
    make_run(s3.run_dir, "stratified", 3, {"a": 1.0}, config=cfg)
    with pytest.raises(MixlabError, match=r"train.steps: run has 99, plan has 10"):
        run_all(plan4.specs, launcher=FakeLauncher(make_run), poll_s=0, cores=2)
    launcher = FakeLauncher(make_run)
    outcome = run_all(plan4.specs, launcher=launcher, poll_s=0, cores=2, force=True)
    assert outcome[s3.key] == "finished" and (s3.key, False, 1) in launcher.calls


def test_failed_run_skips_the_runs_that_need_it(plan4, make_run):
    specs = plan4.specs
    specs[2].needs = [specs[0].key]  # natural/seed3 needs stratified/seed3 (as DoReMi would)
    launcher = FakeLauncher(make_run, fail=[specs[0].key])
    out = io.StringIO()
    outcome = run_all(specs, jobs=1, launcher=launcher, poll_s=0, cores=2,
                      progress=Progress(stream=out))  # fmt: skip
    assert outcome[specs[0].key] == "failed"
    assert outcome[specs[2].key] == "skipped"
    assert outcome[specs[1].key] == outcome[specs[3].key] == "finished"
    assert specs[2].key not in [c[0] for c in launcher.calls]
    assert "FAILED stratified/seed3 (exit 1)" in out.getvalue()


def test_needs_wait_for_the_reference_run(plan4, make_run):
    specs = plan4.specs
    specs[1].needs = [specs[3].key]  # stratified/seed4 waits for natural/seed4 (the last one)
    launcher = FakeLauncher(make_run)
    run_all(specs, jobs=2, launcher=launcher, poll_s=0, cores=2)
    order = [c[0] for c in launcher.calls]
    assert order.index(specs[1].key) > order.index(specs[3].key)


def test_interrupt_stops_every_live_run_once(plan4, make_run):
    launcher = FakeLauncher(make_run, interrupt=[plan4.specs[0].key], ticks=100)
    with pytest.raises(KeyboardInterrupt):
        run_all(plan4.specs, jobs=2, launcher=launcher, poll_s=0, cores=2)
    assert [len(p.signals) for p in launcher.procs.values()] == [1, 1]
    assert all(p.signals == [signal.SIGINT] for p in launcher.procs.values())


# ---------------------------------------------------------------------------------------------
# End to end: real `mixlab train` subprocesses on a tiny synthetic data dir


@pytest.mark.slow
def test_compare_end_to_end(tiny_data, tmp_path):
    raw = _raw(tiny_data, compare={"mixers": ["stratified", "natural"], "seeds": 2})
    raw["train"]["seed"] = 0
    plan = plan_compare(None, tmp_path / "cmp", raw=raw)
    result = compare(plan, jobs=2, progress=Progress(enabled=False), poll_s=0.2)
    assert result.failed == []
    assert set(result.outcome.values()) == {"finished"}
    cmp = result.comparison
    assert [m.method for m in cmp.methods] == ["stratified", "natural"]
    summaries = {
        (s.mixer, s.seed): json.loads((s.run_dir / "summary.json").read_text()) for s in plan.specs
    }
    natural = cmp.methods[1]
    for seed in (0, 1):
        expected = summaries["natural", seed]["test"]["avg_ppl"] - summaries["stratified", seed][
            "test"]["avg_ppl"]  # fmt: skip
        assert natural.diffs[seed] == pytest.approx(expected, rel=1e-12)
    md = (plan.out / "comparison.md").read_text()
    assert md == result.markdown and "| natural |" in md
    rows = list(csv.DictReader((plan.out / "comparison.csv").open()))
    assert float(rows[0]["avg_test_ppl"]) == summaries["stratified", 0]["test"]["avg_ppl"]

    # Everything is reused the second time.
    again = compare(plan, jobs=2, progress=Progress(enabled=False), poll_s=0.2)
    assert set(again.outcome.values()) == {"reused"}
