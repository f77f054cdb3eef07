"""mixlab demo: the packaged config is valid for every dynamic mixer in the registry."""

from __future__ import annotations

from pathlib import Path

from mixlab.commands.demo import DemoConfig, cache_dir, demo_config_text, load_demo_config
from mixlab.config import from_dict
from mixlab.mixers.base import MIXERS, mixer_class
from mixlab.report.compare import plan_compare


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
