from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.train.conftest import assert_resume_identical, die_after, metrics_lines

from mixlab.errors import CheckpointError, ConfigError, MixlabError
from mixlab.mixers.base import Mixer, Plan, register
from mixlab.model import per_sample_loss
from mixlab.train.loop import TIMING_KEYS, Trainer, train


def _strip_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


def test_run_dir_contents(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_cfg(), run)
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.safetensors"):
        assert (run / name).is_file(), name
    recs = metrics_lines(run)
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    eval_steps = [r["step"] for r in recs if r["kind"] == "eval"]
    assert train_steps == [4, 8, 12, 16, 20, 24]
    assert eval_steps == [8, 16, 24]
    assert summary["steps"] == 24 and summary["tokens"] == 24 * 8 * 16
    assert set(summary["test"]["ppl"]) == {"a", "b", "c"}
    for d, loss in summary["test"]["loss"].items():
        assert summary["test"]["ppl"][d] == pytest.approx(math.exp(loss))
    assert summary["test"]["avg_ppl"] == pytest.approx(np.mean(list(summary["test"]["ppl"].values())))
    assert sum(summary["weights_avg"].values()) == pytest.approx(1.0)
    assert sum(summary["tokens_per_domain"].values()) == 24 * 8 * 16
    # The model learns: final val loss is below the loss of a uniform guess over 64 tokens.
    assert summary["val"]["avg_loss"] < math.log(64)


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    # Stop after step 13 without a final checkpoint, as a SIGKILL would.
    assert_resume_identical(lambda: tiny_cfg("checkpoint.every=5"), tmp_path, kill_after=13)


DYNAMIC_OPTIONS = {
    "aioli": ["mixer.options.round_steps=16", "mixer.options.lp_rounds=1", "mixer.options.lp_steps=2"],
    "doremi": ["mixer.options.sampling='alpha'"],
    "odm": [],
    "skillit": ["mixer.options.graph_steps=2", "mixer.options.update_every=6",
                "mixer.options.eval_every=3"],
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_OPTIONS))
def test_resume_is_bit_identical_for_dynamic_mixers(name, tiny_cfg, tmp_path):
    extra = ["checkpoint.every=9", f"mixer.name='{name}'", *DYNAMIC_OPTIONS[name]]
    if name == "doremi":
        train(tiny_cfg("train.steps=6"), tmp_path / "ref")
        extra.append(f"mixer.reference='{tmp_path / 'ref'}'")
    assert_resume_identical(lambda: tiny_cfg(*extra), tmp_path, kill_after=19)
    weights = [r["weights"] for r in metrics_lines(tmp_path / "full") if r["kind"] == "train"]
    assert len({tuple(w.values()) for w in weights}) > 1, "the mixture never moved"


def test_existing_run_dir_needs_resume(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path / "r")
    with pytest.raises(MixlabError, match="--resume"):
        train(tiny_cfg(), tmp_path / "r")
    # Resuming a finished run is a no-op that returns its summary.
    again = train(tiny_cfg(), tmp_path / "r", resume=True)
    assert again == json.loads((tmp_path / "r" / "summary.json").read_text())


def test_checkpoint_from_other_config_is_refused(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("checkpoint.every=4"), tmp_path / "r")
    trainer.train_step = die_after(trainer.train_step, 6)
    with pytest.raises(SystemExit):
        trainer.run()
    with pytest.raises(CheckpointError, match=r"optim.lr: checkpoint has 0.003, config has 0.01"):
        train(tiny_cfg("checkpoint.every=4", "optim.lr=0.01"), tmp_path / "r", resume=True)




def test_loss_weighting_matches_hand_computed(tiny_cfg, tmp_path):
    cfg = tiny_cfg("mixer.name='fixed'", "mixer.apply='loss'",
                   "mixer.options.weights={a=0.5, b=0.3, c=0.2}")
    trainer = Trainer(cfg, tmp_path / "r")
    plan = trainer.session.plan(0)
    np.testing.assert_allclose(plan.weights, [1 / 3] * 3)
    np.testing.assert_allclose(plan.loss_weights, [0.5, 0.3, 0.2])
    # Reproduce the step's batch and loss by hand from a copy of the sampler and model.
    import copy

    sampler = copy.deepcopy(trainer.session.sampler)
    model = copy.deepcopy(trainer.model)
    batch = sampler.next_batch(weights=plan.weights)
    losses = per_sample_loss(model, batch.tokens)
    factor = torch.tensor([0.5, 0.3, 0.2]) / (1 / 3)
    expected = float((losses.detach() * factor[batch.domains]).sum() / len(losses))
    _, result = trainer.train_step(0)
    assert result.loss == pytest.approx(expected, rel=1e-6)


@register("_test_nan_mixer")
class _Probe(Mixer):
    """Records what it observed (for tests)."""

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.seen: list[np.ndarray] = []

    def plan(self, step):
        return Plan(weights=np.full(self.ctx.m, 1 / self.ctx.m))

    def observe(self, step, signals):
        losses, counts = signals.train_losses(), signals.train_counts()
        # A domain absent from the batch has NaN by contract; every present one must be finite.
        self.seen.append(losses[counts > 0])


def test_nonfinite_loss_is_skipped_and_never_observed(tiny_cfg, tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg("mixer.name='_test_nan_mixer'", "train.max_nonfinite=3"), tmp_path / "r")
    import mixlab.train.loop as loop

    real = loop.per_sample_loss
    calls = {"n": 0}

    def sometimes_nan(model, tokens):
        out = real(model, tokens)
        if model.training:
            calls["n"] += 1
            if calls["n"] in (3, 4):
                return out * float("nan")
        return out

    monkeypatch.setattr(loop, "per_sample_loss", sometimes_nan)
    summary = trainer.run()
    assert summary["nonfinite_steps"] == 2
    assert summary["steps"] == 24
    assert len(trainer.session.mixer.seen) == 22
    assert all(np.isfinite(x).all() for x in trainer.session.mixer.seen)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_nonfinite_stops_with_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    import mixlab.train.loop as loop

    real = loop.per_sample_loss
    monkeypatch.setattr(loop, "per_sample_loss", lambda m, t: real(m, t) * float("inf") if m.training else real(m, t))
    with pytest.raises(MixlabError, match="3 consecutive steps had a NaN/inf loss"):
        train(tiny_cfg("train.max_nonfinite=3"), tmp_path / "r")
    assert list((tmp_path / "r" / "checkpoints").glob("step-0000003"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy on MLflow's own code
def test_the_nonfinite_abort_ends_the_tracker_run_as_failed(tiny_cfg, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    import mixlab.train.loop as loop

    real = loop.per_sample_loss
    monkeypatch.setattr(loop, "per_sample_loss", lambda m, t: real(m, t) * float("inf") if m.training else real(m, t))
    with pytest.raises(MixlabError, match="NaN/inf loss"):
        train(tiny_cfg("train.max_nonfinite=3", "log.mlflow=true"), tmp_path / "r")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'r' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mixlab").experiment_id])
    # Before the loop closed its trackers on every exit, this run stayed RUNNING.
    assert run.info.status == "FAILED"


def test_eval_is_deterministic(tiny_cfg, tmp_path):
    a = Trainer(tiny_cfg(), tmp_path / "a")
    b = Trainer(tiny_cfg(), tmp_path / "b")
    assert a.evaluate("val") == b.evaluate("val")
    for d in a.domains:
        assert torch.equal(a.session.val_set.windows[d], b.session.val_set.windows[d])
    other = Trainer(tiny_cfg("train.seed=1"), tmp_path / "c")
    assert not all(torch.equal(a.session.val_set.windows[d], other.session.val_set.windows[d]) for d in a.domains)


def test_unknown_domain_and_bad_batch(tiny_cfg, tmp_path):
    from mixlab.errors import DataError

    with pytest.raises(DataError, match="domain 'zz' is not in this data dir"):
        Trainer(tiny_cfg("data.domains=['a','zz']"), tmp_path / "r")
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(tiny_cfg("train.grad_accum=3"), tmp_path / "r")


def test_grad_accum_matches_single_batch(tiny_cfg, tmp_path):
    one = train(tiny_cfg(), tmp_path / "one")
    two = train(tiny_cfg("train.grad_accum=2"), tmp_path / "two")
    for d in one["test"]["loss"]:
        assert two["test"]["loss"][d] == pytest.approx(one["test"]["loss"][d], rel=1e-4)


def test_target_from_domain(tiny_cfg, tmp_path):
    summary = train(tiny_cfg("target.domain='c'", "target.docs=6"), tmp_path / "r")
    assert summary["test"]["target_loss"] is not None
    assert math.isfinite(summary["test"]["target_loss"])


def test_hf_model_trains_and_resumes(tiny_cfg, tmp_path):
    pytest.importorskip("transformers")
    hf = ["model.kind='hf'",
          "model.hf_options={model_type='gpt2', n_layer=1, n_embd=32, n_head=2, n_positions=32, "
          "resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0}", "checkpoint.every=10"]
    full = train(tiny_cfg(*hf), tmp_path / "full")
    assert full["val"]["avg_loss"] < math.log(64)
    trainer = Trainer(tiny_cfg(*hf), tmp_path / "cut")
    trainer.train_step = die_after(trainer.train_step, 15)
    with pytest.raises(SystemExit):
        trainer.run()
    resumed = train(tiny_cfg(*hf), tmp_path / "cut", resume=True)
    assert _strip_timing(resumed) == _strip_timing(full)


def test_tensorboard_events(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_cfg("log.tensorboard=true"), tmp_path / "r")
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))
