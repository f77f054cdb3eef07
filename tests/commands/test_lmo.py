"""``mixlab lmo`` on real (tiny) run dirs: static runs on five mixtures, an Aioli run and a
DoReMi proxy; the files it writes, what it reads from each run, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.train.conftest import tiny_overrides

from mixlab.cli import main
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.orchestrate.lmo_runs import lmo_section
from mixlab.train.config import load_config
from mixlab.train.loop import train

FIXED = {
    "f1": "{a=0.6,b=0.2,c=0.2}",
    "f2": "{a=0.2,b=0.6,c=0.2}",
    "f3": "{a=0.2,b=0.2,c=0.6}",
    "f4": "{a=0.45,b=0.45,c=0.1}",
}
PNG = b"\x89PNG\r\n\x1a\n"


def _train(data: Path, out: Path, *extra: str) -> Path:
    base = ["train.steps=16", "eval.every=2", "train.log_every=1", "optim.warmup_steps=2"]
    train(load_config(None, tiny_overrides(data, [*base, *extra])), out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmo")
    data = make_synthetic_datadir(root / "data", {"a": 40, "b": 40, "c": 10}, vocab_size=64)
    out = {"stratified": _train(data, root / "stratified")}
    for name, w in FIXED.items():
        out[name] = _train(data, root / name, "mixer.name=fixed", f"mixer.options.weights={w}")
    out["aioli"] = _train(data, root / "aioli", "mixer.name=aioli", "mixer.options.round_steps=6",
                          "mixer.options.lp_rounds=1", "mixer.options.lp_steps=1")  # fmt: skip
    out["doremi"] = _train(data, root / "doremi", "mixer.name=doremi",
                           f"mixer.reference='{root / 'stratified'}'")  # fmt: skip
    out["data"] = data
    return out


def _train_lines(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def _dirs(runs: dict[str, Path]) -> list[str]:
    return [str(p) for k, p in runs.items() if k != "data"]


def test_lmo_writes_tables_json_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "lmo"
    assert main(["lmo", *_dirs(runs), "--out", str(out), "--window", "3"]) == 0
    res = json.loads((out / "lmo.json").read_text())
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["stratified", "fixed (f1)", "fixed (f2)", "fixed (f3)", "fixed (f4)",
                      "aioli", "doremi"]  # fmt: skip
    assert res["domains"] == ["a", "b", "c"] and res["window"] == 3

    # Evaluations at 2, 4, ..., 16: 7 transitions, windows of 3 and 4 (the remainder of 7 / 3
    # joins the last window), steps 2-8 and 8-16.
    pooled = [d for d in res["dynamic"] if d["fit"] == "pooled"]
    assert [(d["window"], d["transitions"], d["rank"]) for d in pooled] == [(0, 21, 3), (1, 28, 3)]
    assert pooled[1]["step_ranges"] == [[8, 16]] * 7
    assert pooled[0]["runs"] == labels
    per_run = [d for d in res["dynamic"] if d["fit"] != "pooled"]
    assert len(per_run) == 2 * len(labels)
    assert {d["rank"] for d in per_run if d["fit"].startswith(("fixed", "strat"))} == {1}
    for d in res["dynamic"]:
        assert np.array(d["A"]).shape == (3, 3)
        assert set(d["quality"]) == {"mse", "r2", "loo_mse", "loo_r2"}

    # The DoReMi proxy samples uniformly and weights the loss by α: its mixture is α. The
    # mixture of transition (2, 4] is the mean of the α logged at steps 3 and 4.
    doremi = next(r for r in res["runs"] if r["label"] == "doremi")
    assert doremi["mixture_source"].startswith("DoReMi's α")
    alpha = {ln["step"]: ln["mixer"]["alpha"] for ln in _train_lines(runs["doremi"])}
    fit0 = next(d for d in per_run if d["fit"] == "doremi" and d["window"] == 0)
    np.testing.assert_allclose(fit0["mixtures"][0], np.mean([alpha[3], alpha[4]], axis=0),
                               rtol=1e-15)  # fmt: skip

    # The static law is fitted on the five runs whose mixture never changed.
    assert res["static"]["runs"] == labels[:5]
    assert np.allclose(np.array(res["static"]["A"]).sum(axis=1), 0.0, atol=1e-9)

    # DoReMi's A: diag of the excess logged inside the window; Aioli's: its mean A_raw.
    dist = res["method_distance"]
    assert {(d["run"], d["window"], d["compared_with"]) for d in dist} == {
        (run, w, ref) for run in ("aioli", "doremi") for w in (0, 1)
        for ref in ("own fit", "pooled fit")
    }  # fmt: skip
    lines = _train_lines(runs["doremi"])
    excess = np.mean([ln["mixer"]["excess"] for ln in lines if 2 < ln["step"] <= 8], axis=0)
    d0 = next(d for d in dist if d["run"] == "doremi" and d["window"] == 0)
    np.testing.assert_allclose(d0["method_A"], np.diag(excess), rtol=1e-15)
    a_raw = [ln["mixer"]["A_raw"] for ln in _train_lines(runs["aioli"])
             if 8 < ln["step"] <= 16 and ln["mixer"]["A_raw"] is not None]  # fmt: skip
    a1 = next(d for d in dist if d["run"] == "aioli" and d["window"] == 1)
    np.testing.assert_allclose(a1["method_A"], np.mean(a_raw, axis=0), rtol=1e-15)
    for d in dist:
        assert -1 <= d["cosine"] <= 1 and 0 <= d["rel_error"] <= 1

    md = (out / "lmo.md").read_text()
    # A static run identifies only A p̄: no matrix is printed for it, the pooled fit is.
    assert "**stratified**: A is not identified in any window" in md
    assert "**pooled, window 0 (steps 2–8)**" in md
    for heading in ("Linear dynamic law: fit quality", "Fitted A per window",
                    "Static log-linear law", "A method's A against the fitted A"):  # fmt: skip
        assert f"### {heading}" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["lmo_A.png", "lmo_fit.png", "lmo_static.png"]
    for name in pngs:
        assert f"]({name})" in md
        assert (out / name).read_bytes().startswith(PNG)
    assert "pooled: A determined in 2 of 2 window(s)" in capsys.readouterr().out


def test_lmo_section_for_the_report(runs):
    md, images = lmo_section([runs["stratified"], runs["doremi"]], level=3)
    assert md.startswith("### Mixing laws (LMO)")
    assert set(images) == {"lmo_fit.png", "lmo_A.png"}
    for name, png in images.items():
        assert f"]({name})" in md and png.startswith(PNG)
    # Two runs cannot fit the static law (it needs m + 2 = 5 fixed-mixture runs).
    assert "needs at least 5 runs on fixed mixtures" in md


def test_run_without_transitions_is_noted(runs, tmp_path):
    once = _train(runs["data"], tmp_path / "once", "eval.every=0", "train.steps=4")
    md, images = lmo_section([once])
    assert "no dynamic fit" in md and images == {}


def test_errors(runs, tmp_path, capsys):
    other = _train(runs["data"], tmp_path / "ab", "data.domains=['a','b']", "train.steps=4")
    assert main(["lmo", str(runs["stratified"]), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "different domains" in capsys.readouterr().err
    assert main(["lmo", str(runs["stratified"]), "--out", str(tmp_path / "o"), "--window", "-1"]) == 2
    assert "--window must be >= 0" in capsys.readouterr().err
    assert main(["lmo", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_runs_with_another_domain_order_are_aligned(runs, tmp_path):
    rev = _train(runs["data"], tmp_path / "rev", "data.domains=['c','b','a']", "mixer.name=doremi",
                 f"mixer.reference='{runs['stratified']}'")  # fmt: skip
    lines = _train_lines(rev)
    res = json.loads((_lmo_json(tmp_path, runs["stratified"], rev)).read_text())
    assert res["domains"] == ["a", "b", "c"]
    # Mixer reports are lists in the run's order (c, b, a): read back in the analysis' order.
    excess = np.mean([ln["mixer"]["excess"][::-1] for ln in lines if 2 < ln["step"] <= 16], axis=0)
    d = next(x for x in res["method_distance"] if x["compared_with"] == "own fit")
    np.testing.assert_allclose(d["method_A"], np.diag(excess), rtol=1e-15)
    fit = next(x for x in res["dynamic"] if x["fit"] == "doremi")
    alpha = {ln["step"]: ln["mixer"]["alpha"][::-1] for ln in lines}
    np.testing.assert_allclose(fit["mixtures"][0], np.mean([alpha[3], alpha[4]], axis=0),
                               rtol=1e-15)  # fmt: skip


def _lmo_json(tmp_path: Path, *dirs: Path) -> Path:
    out = tmp_path / "lmo"
    assert main(["lmo", *map(str, dirs), "--out", str(out)]) == 0
    return out / "lmo.json"
