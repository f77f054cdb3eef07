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
from mixlab.orchestrate.compare import CompareConfig, compare, plan_compare, write_plan
from mixlab.orchestrate.launch import parallelism, train_command
from mixlab.orchestrate.scheduler import Progress, StepTail, run_all
from mixlab.orchestrate.spec import RunSpec
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


# ---------------------------------------------------------------------------------------------
# Issue 15, item 6: train.threads set by the user wins over --jobs; budgets are never mixed


def test_train_threads_defaults_to_unset():
    """0 is train.threads' default ("torch's default"): only then does compare choose."""
    from mixlab.train.config import TrainConfig

    assert TrainConfig().train.threads == 0


def test_parallelism_keeps_the_users_threads():
    assert parallelism(None, 10, cores=8, threads=0) == (8, 1)  # unset: compare chooses
    assert parallelism(2, 10, cores=8, threads=0) == (2, 4)
    assert parallelism(None, 10, cores=8, threads=2) == (4, 2)  # J defaults to 8 // 2
    assert parallelism(None, 10, cores=8, threads=16) == (1, 16)  # never below one job
    assert parallelism(3, 10, cores=8, threads=4) == (3, 4)  # both given: both kept
    assert parallelism(None, 1, cores=8, threads=2) == (1, 2)


@pytest.mark.parametrize(
    ("where", "jobs", "expect_j", "oversubscribed"),
    [("set", None, 1, False), ("config", None, 1, False), ("set", 2, 2, True)],
)
def test_user_train_threads_win_over_jobs(tmp_path, make_run, where, jobs, expect_j,
                                          oversubscribed):  # fmt: skip
    """train.threads = 3 from --set or from the config file is what every run gets, not
    cores // jobs (= 1 on 2 cores); with 2 cores and 3 threads one run goes at a time unless
    --jobs asks for more, and then compare says the cores are oversubscribed."""
    raw = _raw(tmp_path / "data", compare={"mixers": ["stratified", "natural"], "seeds": 2})
    overrides = []
    if where == "set":
        overrides = ["train.threads=3"]
    else:
        raw["train"]["threads"] = 3
    plan = plan_compare(None, tmp_path / "out", overrides=overrides, raw=raw)
    assert {s.config["train"]["threads"] for s in plan.specs} == {3}
    launcher = FakeLauncher(make_run)
    out = io.StringIO()
    run_all(plan.specs, jobs=jobs, launcher=launcher, poll_s=0, cores=2,
            progress=Progress(stream=out, every_s=0))  # fmt: skip
    assert [c[2] for c in launcher.calls] == [3, 3, 3, 3]
    assert launcher.max_live == expect_j
    log = out.getvalue()
    assert f"{expect_j} at a time with 3 thread(s) each (train.threads of the config)" in log
    assert ("exceed the 2 cores" in log) is oversubscribed


def test_unset_train_threads_is_chosen_by_compare(plan4, make_run):
    launcher = FakeLauncher(make_run)
    run_all(plan4.specs, jobs=1, launcher=launcher, poll_s=0, cores=4)
    assert [c[2] for c in launcher.calls] == [4, 4, 4, 4]  # cores // jobs


# Runs of two budgets: 40 steps (stratified, aioli) and 80 steps (odm, stratified), seed 0;
# tokens = steps x 16 x 128 (conftest.write_run). Average test PPLs by hand: the mean of the
# three domain values.
BUDGET_RUNS = {
    "s40": ("stratified", 40, {"code": 10.0, "legal": 20.0, "news": 30.0}),  # avg 20
    "a40": ("aioli", 40, {"code": 9.0, "legal": 19.0, "news": 29.0}),  # avg 19 -> -1 vs s40
    "o80": ("odm", 80, {"code": 5.0, "legal": 10.0, "news": 15.0}),  # avg 10
    "s80": ("stratified", 80, {"code": 6.0, "legal": 12.0, "news": 18.0}),  # avg 12 -> o80 -2
}


@pytest.fixture
def two_budgets(tmp_path, make_run):
    return [
        make_run(tmp_path / name, mixer, 0, ppl, steps=steps)
        for name, (mixer, steps, ppl) in BUDGET_RUNS.items()
    ]


def test_runs_of_different_budgets_are_never_paired(two_budgets):
    runs = collect_runs(two_budgets)
    # The two stratified runs share mixer and seed: their labels name their dirs.
    assert [r.label for r in runs] == ["stratified (s40)", "aioli", "odm", "stratified (s80)"]
    cmp = build_comparison(runs)
    # No run is paired with a run of the other budget: odm (80 steps, avg 10) against
    # stratified (s40) (40 steps, avg 20) would be -10, and stratified (s80) -8.
    assert {(r.method, r.diff) for r in cmp.runs} == {
        ("stratified (s40)", 0.0), ("aioli", -1.0), ("odm", 0.0), ("stratified (s80)", 2.0),
    }  # fmt: skip
    from mixlab.report.table import Budget

    assert [g.budgets for g in cmp.groups] == [[Budget(40, 40 * 2048)], [Budget(80, 80 * 2048)]]
    g40, g80 = cmp.groups
    assert (g40.baseline, [m.method for m in g40.methods]) == ("stratified (s40)",
                                                               ["stratified (s40)", "aioli"])
    assert (g80.baseline, [m.method for m in g80.methods]) == ("odm", ["odm", "stratified (s80)"])
    assert g40.methods[1].diffs == {0: -1.0}  # aioli 19 - stratified 20, both 40 steps
    assert g80.methods[1].diffs == {0: 2.0}  # stratified 12 - odm 10, both 80 steps

    md = to_markdown(cmp, title="Results")
    assert "These runs have 2 different training budgets" in md
    b1 = md.index("## Budget 1 of 2: 40 steps, 81,920 training tokens per run")
    b2 = md.index("## Budget 2 of 2: 80 steps, 163,840 training tokens per run")
    assert b1 < b2
    assert "80 steps" not in md[b1:b2] and "40 steps" not in md[b2:].split("Notes:")[0]
    assert "| aioli | 19.00 | -1.00 (n=1) | 1/1 |" in md[b1:b2]
    assert "| stratified (s80) | 12.00 | +2.00 (n=1) | 0/1 |" in md[b2:]
    assert md.count("Notes:") == 1

    rows = list(csv.DictReader(io.StringIO(to_csv(cmp))))
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by["aioli", "0"]["baseline"] == "stratified (s40)"
    assert by["odm", "0"]["baseline"] == "odm" and by["odm", "0"]["diff_avg_ppl"] == "0.0"
    assert (by["aioli", "mean"]["steps"], by["odm", "mean"]["steps"]) == ("40", "80")
    assert float(by["stratified (s80)", "mean"]["diff_avg_ppl"]) == 2.0


def test_one_budget_keeps_one_table(three_methods):
    cmp = build_comparison(collect_runs([three_methods]))
    assert cmp.groups == [] and len(cmp.budgets) == 1
    assert "Budget 1" not in to_markdown(cmp)


def test_report_has_one_table_and_figure_per_budget(two_budgets, tmp_path):
    from mixlab.report.html import build_report

    report = build_report(two_budgets, tmp_path / "rep")
    names = [f.name for f in report.figures]
    assert "comparison.png" in names and "comparison-2.png" in names
    titles = [f.title for f in report.figures if f.name.startswith("comparison")]
    assert titles == ["Final comparison, 40 steps, 81,920 training tokens per run",
                      "Final comparison, 80 steps, 163,840 training tokens per run"]  # fmt: skip
    md = report.markdown.read_text()
    assert "### Budget 1 of 2: 40 steps" in md and "### Budget 2 of 2: 80 steps" in md


# DoReMi's reference model is extra compute of the method, counted in one place: summary.json.


def test_with_input_steps_counts_reference_and_prior_runs(tmp_path, make_run):
    from mixlab.report.runs import read_config, summary_extra_steps, with_input_steps

    # The reference itself counted 5 extra steps: 40 + 5 = 45 are behind it.
    ref = make_run(tmp_path / "ref", "stratified", 0, {"a": 10.0}, steps=40, extra_steps=5)
    prior = make_run(tmp_path / "prior", "natural", 0, {"a": 10.0}, steps=7)
    run = make_run(tmp_path / "dr", "doremi", 0, {"a": 9.0}, steps=40, extra_steps=3,
                   overrides=[f"mixer.reference={ref}"])  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    cfg = read_config(run)
    counted = with_input_steps(summary, cfg)
    assert counted["extra_steps"] == 3 + 45
    assert counted["input_runs"] == {
        "own_extra_steps": 3, "runs": {"mixer.reference": {"run": str(ref), "steps": 45}},
    }  # fmt: skip
    assert with_input_steps(counted, cfg) == counted  # counted once
    assert summary_extra_steps(summary, cfg) == summary_extra_steps(counted, cfg) == 48
    # Aioli's prior_run: 7 steps; a run that reads nothing is left as it is.
    aioli = make_run(tmp_path / "ai", "aioli", 0, {"a": 9.0},
                     overrides=[f"mixer.options.prior_run='{prior}'"])  # fmt: skip
    s = json.loads((aioli / "summary.json").read_text())
    assert with_input_steps(s, read_config(aioli))["extra_steps"] == 7
    plain = json.loads((prior / "summary.json").read_text())
    assert with_input_steps(plain, read_config(prior)) is plain

    # The table reads the summary's number; once the reference is gone it still does.
    (run / "summary.json").write_text(json.dumps(counted))
    import shutil

    shutil.rmtree(ref)
    cmp = build_comparison(collect_runs([run]))
    assert [r.extra_steps for r in cmp.runs] == [48]
