"""data.max_epochs in real (tiny) training runs: every registered mixer stays within the
budget at every step, the budget changes what is trained when it binds, what is logged is what
was trained, and a killed and resumed run is identical to an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.train.conftest import assert_resume_identical, metrics_lines, tiny_overrides
from tests.train.test_faults import CASES

from mixlab.errors import ConfigError
from mixlab.mixers import MIXERS
from mixlab.mixers.base import resolve_plan
from mixlab.train.config import load_config
from mixlab.train.loop import Trainer, train

# tiny_data with seq_len 16 (17-token windows): a 117, b 117, c 29 training windows. 24 steps x
# 8 = 192 windows; unbudgeted stratified sampling reads c 2.38 times (69 windows).
EPOCHS = 0.75  # floor(0.75 * n) = 87, 87, 21: 195 windows for 192 draws, every domain binds


@pytest.fixture
def reference_run(tiny_data, tmp_path):
    """A finished stratified run, DoReMi's reference model."""
    ref = tmp_path / "ref"
    train(load_config(None, tiny_overrides(tiny_data, ["train.steps=6"])), ref)
    return ref


def _cfg(data, case: str, ref=None, *extra: str):
    mixer = "stratified" if case == "dwm" else case
    more = [f"mixer.reference='{ref}'"] if case == "doremi" else []
    return load_config(
        None, tiny_overrides(data, [f"mixer.name='{mixer}'", *CASES[case], *more, *extra])
    )


def _spy(trainer: Trainer) -> list[dict]:
    """Record, for every step, the mixer's resolved plan without and with the budget and the
    sampler's drawn counts after the batch; returns the (growing) list of records."""
    seen: list[dict] = []
    session = trainer.session
    resolve, step_fn, mixer_plan = session.plan, trainer.train_step, session.mixer.plan
    cfg = trainer.cfg.mixer
    raw: dict = {}

    def spy_mixer_plan(step):
        raw["plan"] = mixer_plan(step)
        return raw["plan"]

    def spy_resolve(step):
        out = resolve(step)
        free = resolve_plan(raw["plan"], trainer.m, cfg.apply, cfg.name)
        seen.append({"free": free, "plan": out, "before": session.sampler.windows_drawn})
        return out

    def spy_step(step):
        result = step_fn(step)
        seen[-1]["after"] = session.sampler.windows_drawn
        return result

    session.mixer.plan, session.plan, trainer.train_step = spy_mixer_plan, spy_resolve, spy_step
    return seen


def test_cases_cover_every_registered_mixer():
    # Names with a leading underscore are mixers other test modules register for themselves.
    assert {name for name in MIXERS if not name.startswith("_")} <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mixer_stays_within_the_budget(tiny_data, tmp_path, case, request):
    ref = request.getfixturevalue("reference_run") if case == "doremi" else None
    trainer = Trainer(_cfg(tiny_data, case, ref, f"data.max_epochs={EPOCHS}"), tmp_path / "run")
    n = trainer.session.sampler.n_windows
    limit = np.floor(EPOCHS * n)  # 0.75 * n has no float noise here: n < 2^50
    assert trainer.session.budget is not None and trainer.session.budget.limit.tolist() == limit.tolist()
    seen = _spy(trainer)
    summary = trainer.run()

    assert len(seen) == 24
    for s in seen:
        # Hard invariant, after every batch, not only at the end.
        assert np.all(s["after"] <= limit), (case, s["after"], limit)
        w = np.asarray(s["plan"].weights)
        assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
        if s["plan"].counts is not None:  # exact compositions within what was left
            assert np.all(np.asarray(s["plan"].counts) <= limit - s["before"])
    # summary.json's epochs are drawn / n <= floor(0.75 n) / n <= 0.75.
    epochs = json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_per_domain"]
    assert epochs == summary["epochs_per_domain"]
    assert all(e <= EPOCHS for e in epochs.values()), epochs
    assert sum(seen[-1]["after"]) == 192
    # The budget binds: at some step the trained mixture is not the one the mixer planned.
    changed = [i for i, s in enumerate(seen)
               if not np.array_equal(s["free"].weights, s["plan"].weights)]
    assert changed, f"{case}: the budget never changed the plan"
    if case == "aioli":  # a probe of c after c is spent: exact counts capped, not skipped
        probes = [s for s in seen if s["free"].counts is not None]
        assert any(not np.array_equal(s["free"].counts, s["plan"].counts) for s in probes)
        assert all(s["plan"].phase == "probe" for s in probes)
    # What is logged and averaged is what was trained (the budgeted plan). A train record at
    # step k carries the plan of step k - 1.
    for rec in metrics_lines(tmp_path / "run"):
        if rec["kind"] == "train":
            planned = seen[rec["step"] - 1]["plan"].weights
            assert list(rec["weights"].values()) == [float(x) for x in planned]
    mean = np.zeros(3)
    for s in seen:  # the loop's own order of float additions: exact
        mean = mean + np.asarray(s["plan"].weights, dtype=np.float64)
    assert list(summary["weights_avg"].values()) == (mean / 24).tolist()


def test_a_binding_budget_changes_the_mixture(tiny_cfg, tmp_path):
    """Stratified sampling always wants a third of c: unbudgeted it reads c 69 times (2.38
    epochs); with 0.5 epochs (floor(14.5) = 14 windows) c is read exactly 14 times, and a and b
    take the 55 samples it gave up."""
    free = train(tiny_cfg(), tmp_path / "free")
    capped = train(tiny_cfg("data.max_epochs={c=0.5}"), tmp_path / "capped")
    assert free["tokens_per_domain"]["c"] == 69 * 16  # seq_len 16 tokens per window
    assert capped["epochs_per_domain"]["c"] == 14 / 29
    assert capped["tokens_per_domain"]["c"] == 14 * 16
    assert (capped["tokens_per_domain"]["a"] + capped["tokens_per_domain"]["b"]
            == (192 - 14) * 16)
    # Uniform until c is spent, then c = 0 and a, b = 1/2: c's mean weight is far below 1/3.
    assert capped["weights_avg"]["c"] < 0.1 < free["weights_avg"]["c"] == pytest.approx(1 / 3)
    weights = [r["weights"] for r in metrics_lines(tmp_path / "capped") if r["kind"] == "train"]
    assert weights[-1] == {"a": 0.5, "b": 0.5, "c": 0.0}


def test_even_pace_spreads_the_budget(tiny_cfg, tmp_path):
    """'even': c's share at step 0 is its budget over the whole run, 14 / (24 x 8) windows per
    sample; a and b split the rest equally (stratified's own weights are equal)."""
    trainer = Trainer(tiny_cfg("data.max_epochs={c=0.5}", "data.budget_pace='even'"),
                      tmp_path / "run")
    seen = _spy(trainer)
    summary = trainer.run()
    first = np.asarray(seen[0]["plan"].weights)
    # q_c = 14 / 192 exactly (a cap); q_a = q_b = lam / 3, lam = (1 - 14/192) / (2/3): a few ulp.
    assert first[2] == 14 / 192
    np.testing.assert_allclose(first[:2], (1 - 14 / 192) / 2, rtol=0, atol=1e-15)
    assert summary["epochs_per_domain"]["c"] <= 0.5
    # Spread: c is still sampled in the second half of the run (greedy spends it by step ~8).
    assert sum(int(s["after"][2] - s["before"][2]) for s in seen[12:]) > 0


def _resume_cfg(tiny_cfg, case: str, *extra: str):
    mixer = [f"mixer.name='{case}'", *CASES[case]]
    return lambda: tiny_cfg(*mixer, *extra, "checkpoint.every=4")


@pytest.mark.parametrize(
    ("case", "budget", "limits", "kill_after"),
    [
        # Killed in the end game (checkpoint at 20): every domain close to its budget.
        ("stratified", [f"data.max_epochs={EPOCHS}"], dict.fromkeys("abc", EPOCHS), 22),
        # Aioli's probe counts are capped (its second LearnParams, steps 12-14, after c is spent).
        ("aioli", [f"data.max_epochs={EPOCHS}"], dict.fromkeys("abc", EPOCHS), 14),
        ("importance", ["data.max_epochs={c=0.5}", "data.budget_pace='even'"], {"c": 0.5}, 10),
    ],
)
def test_resume_with_a_budget_is_identical(tiny_cfg, tmp_path, case, budget, limits, kill_after):
    full = assert_resume_identical(_resume_cfg(tiny_cfg, case, *budget), tmp_path, kill_after)
    assert all(full["epochs_per_domain"][d] <= e for d, e in limits.items())


def test_budget_config_errors(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="lasts 16 steps"):
        Trainer(tiny_cfg("data.max_epochs=0.5"), tmp_path / "a")  # 58 + 58 + 14 = 130 < 192
    with pytest.raises(ConfigError, match="'zz'"):
        Trainer(tiny_cfg("data.max_epochs={zz=1.0}"), tmp_path / "b")
    with pytest.raises(ConfigError, match="finite number >= 0"):
        tiny_cfg("data.max_epochs=-1")
    with pytest.raises(ConfigError, match="finite number >= 0"):
        tiny_cfg("data.max_epochs={c=nan}")
    with pytest.raises(ConfigError, match="needs data.max_epochs"):
        tiny_cfg("data.budget_pace='even'")
    with pytest.raises(ConfigError, match="not in data.domains"):
        tiny_cfg("data.domains=['a', 'b']", "data.max_epochs={c=1.0}")
    # 0 everywhere is no budget at all: the run is the unbudgeted one.
    assert Trainer(tiny_cfg("data.max_epochs=0"), tmp_path / "c").session.budget is None
