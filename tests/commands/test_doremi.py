"""``mixlab doremi``: the three stages on a tiny data dir, reuse without retraining, exact
resume of an interrupted stage, config changes that need --force, and extra_steps accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.train.conftest import tiny_overrides

from mixlab.cli import main
from mixlab.report.runs import load_run
from mixlab.report.table import build_comparison
from mixlab.train import loop
from mixlab.train.config import load_config
from mixlab.train.loop import TIMING_KEYS, Trainer


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    sets = tiny_overrides(
        data, ["train.steps=8", "eval.every=4", "train.log_every=2", "optim.warmup_steps=2"]
    )
    argv = ["doremi", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return [*argv, *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def _strip(summary: dict) -> dict:
    # Timing differs between runs; the doremi and input_runs blocks name the pipeline's dirs.
    return {k: v for k, v in summary.items() if k not in (*TIMING_KEYS, "doremi", "input_runs")}


def test_three_stages_then_reuse_without_training(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dr"
    argv = _argv(tiny_data, out, "--reference-steps", "6", "--proxy-steps", "10")
    assert main(argv) == 0
    ref, proxy, final = out / "reference", out / "proxy", out / "final"

    ref_cfg = load_config(ref / "config.toml")
    assert (ref_cfg.mixer.name, ref_cfg.train.steps) == ("stratified", 6)
    proxy_cfg = load_config(proxy / "config.toml")
    assert (proxy_cfg.mixer.name, proxy_cfg.train.steps) == ("doremi", 10)
    assert proxy_cfg.mixer.reference == str(ref.resolve())

    # The proxy's output is its average α (the mixer's running mean at the last step).
    weights = _json(proxy / "summary.json")["weights_final"]
    assert list(weights.values()) == _lines(proxy, "train")[-1]["mixer"]["alpha_avg"]
    assert len(set(weights.values())) == 3  # it learned something other than uniform
    total = sum(weights.values())
    learned = {d: w / total for d, w in weights.items()}

    final_cfg = load_config(final / "config.toml")
    assert final_cfg.mixer.name == "fixed" and final_cfg.train.steps == 8
    assert final_cfg.mixer.options["weights"] == learned
    for line in _lines(final, "train"):  # every step of the final run trains on them
        assert line["weights"] == pytest.approx(learned, abs=1e-15)

    # The proxy is a DoReMi run: its summary counts the reference's 6 steps as extra steps,
    # and a table of the proxy shows that very number (issue 15: it said 0 while the table
    # added 6 on its own).
    proxy_summary = _json(proxy / "summary.json")
    assert (proxy_summary["steps"], proxy_summary["extra_steps"]) == (10, 6)
    assert proxy_summary["input_runs"] == {
        "own_extra_steps": 0, "runs": {"mixer.reference": {"run": str(ref.resolve()), "steps": 6}},
    }  # fmt: skip
    (row,) = build_comparison([load_run(proxy)]).runs
    assert (row.extra_steps, row.total_steps) == (6, 16)

    # The final run counts reference and proxy once each (not the reference twice).
    summary = _json(final / "summary.json")
    assert summary["extra_steps"] == 6 + 10
    assert summary["doremi"] == {
        "reference_run": str(ref.resolve()), "proxy_run": str(proxy.resolve()),
        "reference_steps": 6, "proxy_steps": 10, "final_own_extra_steps": 0,
    }  # fmt: skip
    state = _json(out / "doremi.json")
    assert state["last_call"] == {"reference": "trained", "proxy": "trained", "final": "trained"}
    assert state["weights"] == learned
    printed = capsys.readouterr().out
    assert "learned domain weights" in printed
    assert f"a  {learned['a']:.4f}" in printed
    assert f"average test perplexity {summary['test']['avg_ppl']:.3f}" in printed

    # Second call: nothing trains, no run file is touched (doremi.json records the call).
    before = _mtimes(out)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(loop, "train", no_training)
    monkeypatch.setattr(loop, "Trainer", no_training)
    assert main(argv) == 0
    after = _mtimes(out)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {str(out / "doremi.json")}
    assert _json(out / "doremi.json")["last_call"] == dict.fromkeys(
        ("reference", "proxy", "final"), "reused"
    )
    assert _json(final / "summary.json") == summary
    assert f"a  {learned['a']:.4f}" in capsys.readouterr().out


def test_interrupted_proxy_resumes_bit_identically(tiny_data, tmp_path, monkeypatch):
    extra = ("--set", "checkpoint.every=2")
    assert main(_argv(tiny_data, tmp_path / "whole", *extra)) == 0

    real_train = loop.train

    def killed_proxy(cfg, out, resume=False, log=None):
        if Path(out).name != "proxy":
            return real_train(cfg, out, resume=resume, log=log)
        trainer = Trainer(cfg, out)
        real_step, calls = trainer.train_step, {"n": 0}

        def dying_step(plan):
            calls["n"] += 1
            if calls["n"] > 5:  # killed after step 5; the last checkpoint is at step 4
                raise SystemExit("killed")
            return real_step(plan)

        trainer.train_step = dying_step
        return trainer.run(resume=resume, log=log)

    cut = tmp_path / "cut"
    monkeypatch.setattr(loop, "train", killed_proxy)
    with pytest.raises(SystemExit):
        main(_argv(tiny_data, cut, *extra))
    assert not (cut / "final").exists()
    monkeypatch.setattr(loop, "train", real_train)
    assert main(_argv(tiny_data, cut, *extra)) == 0
    assert _json(cut / "doremi.json")["last_call"] == {
        "reference": "reused", "proxy": "resumed", "final": "trained",
    }  # fmt: skip
    for stage in ("proxy", "final"):
        a = _json(tmp_path / "whole" / stage / "summary.json")
        b = _json(cut / stage / "summary.json")
        assert _strip(a) == _strip(b), stage


def test_changed_config_needs_force_and_redoes_what_depends_on_it(tiny_data, tmp_path, capsys):
    out = tmp_path / "dr"
    assert main(_argv(tiny_data, out)) == 0
    capsys.readouterr()

    assert main(_argv(tiny_data, out, "--proxy-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "proxy stage" in err and "train.steps: run has 8, plan has 6" in err and "--force" in err

    assert main(_argv(tiny_data, out, "--proxy-steps", "6", "--force")) == 0
    state = _json(out / "doremi.json")
    # New proxy weights change the final run's config, so it is redone too.
    assert state["last_call"] == {"reference": "reused", "proxy": "trained", "final": "trained"}
    assert _json(out / "final" / "summary.json")["extra_steps"] == 8 + 6

    # A new reference model makes the proxy stale although its config names the same path.
    assert main(_argv(tiny_data, out, "--proxy-steps", "6", "--reference-steps", "4",
                      "--force")) == 0  # fmt: skip
    state = _json(out / "doremi.json")
    assert state["last_call"] == {"reference": "trained", "proxy": "trained", "final": "trained"}
    assert _json(out / "final" / "summary.json")["extra_steps"] == 4 + 6

    state["reference_summary_sha256"] = "0" * 64  # as if the proxy came from another reference
    (out / "doremi.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(_argv(tiny_data, out, "--proxy-steps", "6", "--reference-steps", "4")) == 2
    assert "reference model has changed" in capsys.readouterr().err


def test_given_reference_and_final_overrides(tiny_data, tmp_path):
    ref = tmp_path / "ref"
    loop.train(load_config(None, tiny_overrides(tiny_data, ["train.steps=6"])), ref)
    out = tmp_path / "dr"
    argv = _argv(tiny_data, out, "--reference", str(ref), "--final-set", "model.d_model=48")
    assert main(argv) == 0
    assert not (out / "reference").exists()
    assert load_config(out / "proxy" / "config.toml").mixer.reference == str(ref.resolve())
    assert load_config(out / "proxy" / "config.toml").model.d_model == 32
    assert load_config(out / "final" / "config.toml").model.d_model == 48
    assert _json(out / "final" / "summary.json")["extra_steps"] == 6 + 8
    assert _json(out / "doremi.json")["last_call"]["reference"] == "given"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--set", "mixer.name=aioli"), "configures the DoReMi proxy"),
        (("--set", "mixer.reference='x'"), "mixer.reference is set by `mixlab doremi`"),
        (("--set", "mixer.options.etaa=1"), "etaa"),
        (("--final-set", "model.d_modl=48"), "d_modl"),
        (("--final-set", "mixer.name=aioli"), "--final-set cannot change [mixer]"),
        (("--reference-mixer", "doremi"), "itself needs a reference model"),
        (("--reference", "nowhere", "--reference-steps", "3"), "drop --reference-steps"),
        (("--reference", "nowhere"), "has no summary.json"),
    ],
)
def test_config_errors_before_anything_trains(tiny_data, tmp_path, capsys, extra, message):
    out = tmp_path / "dr"
    assert main(_argv(tiny_data, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_compare_config_configures_proxy_and_reference(tiny_data, tmp_path):
    from mixlab.orchestrate.doremi import plan_pipeline

    cfg = tmp_path / "cmp.toml"
    cfg.write_text(
        "[compare]\nmixers = ['stratified', 'doremi']\n"
        "[mixer.options]\neps = 0.01\n"
        "[mixers.doremi.options]\neta = 0.5\n"
        "[mixers.temperature.options]\ntau = 3.0\n"
        "[mixers.aioli.options]\neta = 2.0\n"
    )
    sets = tiny_overrides(tiny_data, [])
    plan = plan_pipeline(cfg, tmp_path / "dr", sets, reference_mixer="temperature")
    proxy, ref = plan.proxy_config(), plan.reference_config()
    assert proxy.mixer.name == "doremi" and proxy.mixer.options == {"eps": 0.01, "eta": 0.5}
    assert ref.mixer.name == "temperature" and ref.mixer.options == {"tau": 3.0}
    assert ref.data.dir == str(Path(tiny_data).resolve())
    # Planning validates and writes nothing.
    assert not (tmp_path / "dr").exists()
