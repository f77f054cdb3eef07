"""benchmarks/gpu_check.py: its CPU dry run goes through every part of the GPU check, and the
run comparison it relies on for "resumes identically" can fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _rows(report: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in report.splitlines() if ln.startswith(f"| {first_cell}")]


@pytest.mark.slow
def test_dry_run_has_every_row_and_the_resume_comparison_passes(tmp_path):
    out = tmp_path / "gpu.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--steps", "6", "--out", str(out),
         "--work", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert report.strip() in proc.stdout  # what it prints is what it writes
    assert "bf16 autocast" in report and "runs on: flash" in report
    for label in ("plain (stratified)", "DGA (fd alignments)", "DWM", "Aioli"):
        (row,) = _rows(report, label)
        assert row[2] == "6", row  # steps: the --steps given
        assert float(row[3].replace(",", "")) > 0, row  # tokens/s
        assert row[5] == "n/a (CPU)", row  # peak memory is measured on CUDA only
    (plain,) = _rows(report, "plain (stratified)")
    assert plain[4] == "1.00×"
    (group,) = _rows(report, "process group")
    assert group[1] == "ok" and "gloo process group of 1 rank(s); all_reduce(1) = 1.0" in group[2]
    (again,) = _rows(report, "uninterrupted run, twice")
    assert again[1] == "identical"
    (resumed,) = _rows(report, "killed, then resumed")
    # Killed during step 7 with a checkpoint every 4 steps: the resume starts from step 4.
    assert resumed[1] == "identical" and "resumed from step-0000004" in resumed[2], resumed
    assert "model.safetensors bytes equal, summary.json equal, metrics.jsonl equal" in resumed[2]
    assert "Resume comparison: PASSED" in report
    assert not (tmp_path / "work").exists()  # the scratch dir (~2 GB per run on a GPU) is gone


def _fake_run(run: Path, weight: float, tokens_per_s: float = 100.0) -> Path:
    run.mkdir(parents=True)
    save_file({"w": torch.full((3,), weight)}, str(run / "model.safetensors"))
    summary = {"steps": 4, "test": {"avg_ppl": 9.0}, "wall_time_s": 1.0, "tokens_per_s": tokens_per_s}
    (run / "summary.json").write_text(json.dumps(summary))
    rec = {"kind": "train", "step": 4, "loss": 2.0, "tokens_per_s": tokens_per_s, "elapsed_s": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    return run


def test_run_comparison_ignores_timing_and_catches_one_changed_weight(tmp_path):
    compare_runs = _script().compare_runs
    a = _fake_run(tmp_path / "a", 0.5)
    same, detail = compare_runs(a, _fake_run(tmp_path / "b", 0.5, tokens_per_s=250.0))
    assert same, detail
    # 0.5 + 2^-10 is exact in float32, so the reported difference is exactly 2^-10.
    same, detail = compare_runs(a, _fake_run(tmp_path / "c", 0.5 + 2**-10))
    assert not same
    assert "model.safetensors bytes differ (max |Δθ| = 0.000977)" in detail
    d = _fake_run(tmp_path / "d", 0.5)
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 4, "loss": 2.5}) + "\n")
    same, detail = compare_runs(a, d)
    assert not same and "metrics.jsonl differs" in detail
    (tmp_path / "e").mkdir()
    assert compare_runs(a, tmp_path / "e") == (False, "e did not finish (no summary.json)")
