"""The Hugging Face Trainer integration: tiny randomly initialised GPT-2 models on CPU."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from mixlab.data.format import DataDir  # noqa: E402
from mixlab.data.sampler import Batch, MixtureSampler  # noqa: E402
from mixlab.errors import CheckpointError, ConfigError, MixlabError  # noqa: E402
from mixlab.integrations.hf import (  # noqa: E402
    STATE_FILE,
    MixlabCallback,
    per_sample_cross_entropy,
)
from mixlab.mixers.aioli import probe_counts  # noqa: E402
from mixlab.mixers.base import MIXERS, Mixer, Plan, register  # noqa: E402
from mixlab.mixers.doremi import doremi_update  # noqa: E402
from mixlab.model import per_sample_loss  # noqa: E402
from mixlab.model.hf import HFCausalLM  # noqa: E402
from mixlab.train.evaluate import EvalSet, mean_losses  # noqa: E402

transformers.logging.set_verbosity_error()

SEQ = 16
MICRO, GA = 4, 2
B = MICRO * GA  # global batch: one process
AIOLI = {"round_steps": 4, "lp_rounds": 1, "lp_steps": 1}


def gpt2(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=None, eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config)


def trainer(out: Path, cb: MixlabCallback, model: torch.nn.Module, steps: int = 8, **kwargs):
    """A Trainer wired to ``cb``; ``kwargs`` override TrainingArguments, except the special
    ``loss_log`` (a list that receives every value ``compute_loss`` returns) and
    ``train_dataset`` / ``compute_loss_func`` / ``callbacks`` (replacing mixlab's)."""
    loss_log = kwargs.pop("loss_log", None)
    wiring = {
        "train_dataset": kwargs.pop("train_dataset", cb.train_dataset),
        "compute_loss_func": kwargs.pop("compute_loss_func", cb.compute_loss),
        "callbacks": kwargs.pop("callbacks", [cb]),
    }
    if loss_log is not None:
        def logged(outputs, labels, num_items_in_batch=None):
            loss = cb.compute_loss(outputs, labels, num_items_in_batch)
            loss_log.append(float(loss.detach()))
            return loss

        wiring["compute_loss_func"] = logged
    args = {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": MICRO,
        "gradient_accumulation_steps": GA, "learning_rate": 1e-2, "use_cpu": True,
        "report_to": [], "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
        "seed": 0, **kwargs,
    }
    return transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**args), **wiring
    )


def record_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """The input_ids of every training forward, as the model saw them."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        if module.training:
            seen.append(kwargs["input_ids"].clone())

    model.register_forward_hook(hook, with_kwargs=True)
    return seen


def replay(data: Path, cb: MixlabCallback) -> list[Batch]:
    """The global batch of every step in ``cb.history``, redrawn by a fresh sampler from the
    recorded plans (tokens [B, SEQ + 1] and domains [B] per step)."""
    sampler = MixtureSampler(DataDir.open(data), "train", SEQ, B, seed=0)
    out = []
    for h in cb.history:
        if h.counts is not None:
            batch = sampler.next_batch(counts=h.counts)
        else:
            batch = sampler.next_batch(weights=h.weights)
        assert np.array_equal(batch.global_counts, h.drawn)
        out.append(batch)
    return out


def test_batches_follow_the_plan_and_the_mixture_moves(tiny_data, tmp_path):
    model = gpt2()
    cb = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4)
    seen = record_inputs(model)
    trainer(tmp_path / "out", cb, model).train()

    assert [h.step for h in cb.history] == list(range(8))
    assert [h.phase for h in cb.history] == ["probe"] * 3 + ["train"] + ["probe"] * 3 + ["train"]
    # Probe steps train on exactly the composition Aioli asked for.
    probes = {tuple(row) for row in probe_counts(3, 0.625, B)}  # one sweep (lp_rounds 1)
    for h in cb.history:
        if h.phase == "probe":
            assert tuple(h.counts) in probes and np.array_equal(h.drawn, h.counts)
    assert {tuple(h.counts) for h in cb.history[:3]} == probes
    # Every micro-batch the model trained on is the plan's batch, micro-batches in order.
    expected = replay(tiny_data, cb)
    assert len(seen) == 8 * GA
    for step, batch in enumerate(expected):
        got = torch.cat(seen[step * GA : (step + 1) * GA])
        assert torch.equal(got, batch.tokens[:, :-1]), f"step {step}"
    # The mixture moved after the first round of probes, and the model learned.
    assert not np.allclose(cb.history[3].weights, 1 / 3)
    assert not np.array_equal(cb.history[3].weights, cb.history[7].weights)
    assert np.isclose(cb.history[3].weights.sum(), 1.0)
    assert cb.history[-1].loss < cb.history[0].loss
    assert all(h.observed for h in cb.history) and cb.nonfinite_steps == 0


def test_eval_signal_is_the_fixed_seeded_subset(tiny_data, tmp_path):
    model = gpt2()
    cb = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4, eval_batch_size=3)
    trainer(tmp_path / "out", cb, model, steps=3).train()
    # Aioli's last eval (after step 2) against mixlab's own evaluation of the same subset.
    windows = EvalSet.from_data(DataDir.open(tiny_data), cb.domains, "val", 4, SEQ, seed=1).windows
    wrapped = HFCausalLM(model)
    want = mean_losses(wrapped, windows, 64, torch.device("cpu"))
    got = cb.mixer.last_eval
    np.testing.assert_allclose(got, [want[d] for d in cb.domains], rtol=1e-6)
    assert cb.mixer.last_eval_step == 2


def test_per_sample_cross_entropy_equals_mixlab_loss():
    model = gpt2()
    tokens = torch.randint(0, 64, (3, SEQ + 1), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=tokens[:, :-1]).logits
    torch.testing.assert_close(
        per_sample_cross_entropy(logits, tokens[:, 1:]), per_sample_loss(HFCausalLM(model), tokens),
        rtol=0, atol=0,
    )


@pytest.mark.parametrize("how", ["resume_from", "output_dir"])
def test_resume_continues_exactly(tiny_data, tmp_path, how):
    """A run resumed from its step-4 checkpoint ends exactly as the uninterrupted run: same
    losses, mixture, mixer state and weights, bit for bit (dropout on, so the Trainer's RNG
    restore is part of it). ``how``: the checkpoint named by ``resume_from`` with data skipping
    on, or found in output_dir by ``resume_from_checkpoint=True`` with ``ignore_data_skip``."""
    dropout = 0.1 if how == "resume_from" else 0.0
    full_model = gpt2(dropout=dropout)
    full = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4)
    full_losses: list[float] = []
    trainer(tmp_path / "full", full, full_model, save_strategy="steps", save_steps=4,
            loss_log=full_losses).train()
    ckpt = tmp_path / "full" / "checkpoint-4"
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["global_step"] == 4 and state["session"]["sampler"]["step"] == 4

    model = gpt2(seed=1, dropout=dropout)  # another init: everything must come from the checkpoint
    losses: list[float] = []
    if how == "resume_from":
        cb = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4, resume_from=ckpt)
        trainer(tmp_path / "again", cb, model, loss_log=losses).train(resume_from_checkpoint=str(ckpt))
    else:
        shutil.copytree(ckpt, tmp_path / "again" / "checkpoint-4")
        cb = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4)
        trainer(tmp_path / "again", cb, model, loss_log=losses,
                ignore_data_skip=True).train(resume_from_checkpoint=True)

    assert losses == full_losses[4 * GA :]
    assert [h.step for h in cb.history] == [4, 5, 6, 7]
    for a, b in zip(full.history[4:], cb.history):
        assert a.loss == b.loss and np.array_equal(a.weights, b.weights)
        assert np.array_equal(a.drawn, b.drawn)
    assert cb.mixer.state_dict() == full.mixer.state_dict()
    assert cb.sampler.state_dict() == full.sampler.state_dict()
    for (name, p), q in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name


def test_loss_weighting_equals_the_hand_computed_loss(tiny_data, tmp_path):
    """DoReMi samples uniformly and weights each sample's loss by α_d / q_d. With lr = 0 the
    model stays at its initial weights, so every step's loss can be recomputed by hand."""
    model = gpt2()
    reference = gpt2(seed=5)
    cb = MixlabCallback(tiny_data, "doremi", {"eta": 1.0}, seq_len=SEQ, reference_model=reference)
    returned: list[float] = []
    trainer(tmp_path / "out", cb, model, steps=3, learning_rate=0.0, loss_log=returned).train()

    wrapped, ref = HFCausalLM(model), HFCausalLM(reference)
    alpha, scores = np.full(3, 1 / 3), np.zeros(3)
    for h, batch in zip(cb.history, replay(tiny_data, cb)):
        assert np.array_equal(h.weights, np.full(3, 1 / 3)) and np.allclose(h.loss_weights, alpha)
        with torch.no_grad():
            ell = per_sample_loss(wrapped, batch.tokens).double().numpy()
        domains = batch.domains.numpy()
        factors = alpha[domains] / (1 / 3)
        for k in range(GA):  # what the Trainer back-propagated for each micro-batch
            part = slice(k * MICRO, (k + 1) * MICRO)
            np.testing.assert_allclose(returned[h.step * GA + k], (factors[part] * ell[part]).sum() / B, rtol=1e-6)
        np.testing.assert_allclose(h.loss, np.mean(factors * ell), rtol=1e-6)
        # The reference signal and the DoReMi update, by hand: every token's excess clipped at
        # 0, then the mean per domain (a domain absent from the batch keeps its previous score).
        tok = batch.tokens
        with torch.no_grad():
            ce = [-torch.log_softmax(m(tok[:, :-1]).double(), -1).gather(-1, tok[:, 1:, None])[..., 0]
                  for m in (wrapped, ref)]
        clipped = np.maximum((ce[0] - ce[1]).numpy(), 0.0).mean(axis=1)
        present = [d for d in range(3) if np.any(domains == d)]
        excess = np.full(3, np.nan)
        excess[present] = [clipped[domains == d].mean() for d in present]
        scores = np.where(np.isfinite(excess), excess, scores)
        alpha = doremi_update(alpha, scores, 1.0, 1e-3)
    np.testing.assert_allclose(cb.mixer.alpha, alpha, rtol=1e-6)
    assert not np.allclose(alpha, 1 / 3)


def test_dataloader_workers_and_prefetch_do_not_change_batches(tiny_data, tmp_path):
    runs = []
    for workers in (0, 1):
        cb = MixlabCallback(tiny_data, "odm", seq_len=SEQ)
        trainer(tmp_path / f"w{workers}", cb, gpt2(), steps=5, dataloader_num_workers=workers,
                **({"dataloader_prefetch_factor": 4} if workers else {})).train()
        runs.append(cb)
    assert [h.loss for h in runs[0].history] == [h.loss for h in runs[1].history]
    assert [h.drawn.tolist() for h in runs[0].history] == [h.drawn.tolist() for h in runs[1].history]
    # ODM's exploration rate keeps it uniform for its first m ln m steps, then it moves.
    assert np.allclose(runs[0].history[0].weights, 1 / 3)
    assert not np.allclose(runs[0].history[4].weights, 1 / 3)


def test_evaluate_uses_the_ordinary_causal_lm_loss(tiny_data, tmp_path):
    model = gpt2()
    cb = MixlabCallback(tiny_data, "stratified", seq_len=SEQ)
    ids = torch.randint(0, 64, (4, SEQ), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    t = trainer(tmp_path / "out", cb, model, steps=1, per_device_eval_batch_size=4)
    metrics = t.evaluate(rows)
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels).loss
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-6)


# ------------------------------------------------------------------------------- misuse


if "_test_hf_target" not in MIXERS:

    @register("_test_hf_target")
    class _AsksTarget(Mixer):
        """Asks for the target loss after its first step."""

        def plan(self, step: int) -> Plan:
            return Plan(weights=np.full(self.ctx.m, 1 / self.ctx.m))

        def observe(self, step, signals) -> None:
            signals.target_loss()


def test_a_signal_the_integration_cannot_compute_is_a_clear_error(tiny_data, tmp_path):
    cb = MixlabCallback(tiny_data, "_test_hf_target", seq_len=SEQ)
    with pytest.raises(ConfigError, match=r"needs a target set: set target\.path or target\.domain"):
        trainer(tmp_path / "out", cb, gpt2(), steps=2).train()


def test_missing_compute_loss_func_stops_before_any_update(tiny_data, tmp_path):
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = MixlabCallback(tiny_data, "stratified", seq_len=SEQ)
    with pytest.raises(MixlabError, match="compute_loss_func=mixlab.compute_loss"):
        trainer(tmp_path / "out", cb, model, steps=2, compute_loss_func=None).train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_another_train_dataset_is_refused(tiny_data, tmp_path):
    rows = [{"input_ids": torch.zeros(SEQ, dtype=torch.long), "labels": torch.zeros(SEQ, dtype=torch.long)}] * 8
    cb = MixlabCallback(tiny_data, "stratified", seq_len=SEQ)
    with pytest.raises(ConfigError, match="train_dataset=mixlab.train_dataset"):
        trainer(tmp_path / "out", cb, gpt2(), steps=2, train_dataset=rows).train()


def test_resume_refuses_a_foreign_or_missing_state(tiny_data, tmp_path):
    cb = MixlabCallback(tiny_data, "odm", seq_len=SEQ)
    trainer(tmp_path / "a", cb, gpt2(), steps=2, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    other = MixlabCallback(tiny_data, "odm", {"reward_scale": 0.5}, seq_len=SEQ)
    with pytest.raises(CheckpointError, match=r"mixer\.options\.reward_scale: None in the checkpoint, 0\.5 here"):
        trainer(tmp_path / "a", other, gpt2(), steps=4).train(resume_from_checkpoint=True)
    (ckpt / STATE_FILE).unlink()
    again = MixlabCallback(tiny_data, "odm", seq_len=SEQ)
    with pytest.raises(CheckpointError, match="resume_from="):
        trainer(tmp_path / "a", again, gpt2(), steps=4).train(resume_from_checkpoint=True)


def test_unsupported_trainer_settings_are_refused(tiny_data, tmp_path):
    cb = MixlabCallback(tiny_data, "stratified", seq_len=SEQ)
    with pytest.raises(ConfigError, match="auto_find_batch_size"):
        trainer(tmp_path / "out", cb, gpt2(), steps=2, auto_find_batch_size=True).train()


# ------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_draw_disjoint_slices_and_agree(tiny_data, tmp_path):
    """torchrun, 2 CPU processes (gloo): per_device 2 x GA 2 x 2 ranks = the one-process global
    batch of 8. Both ranks hold the same mixer state; the batches equal the one-process run's,
    and its mixture and losses agree within float32 reduction-order noise."""
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(worker), str(tiny_data), str(tmp_path), "2", "2", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["world"] == 2
    ckpt = tmp_path / "trainer" / "checkpoint-4"
    assert torch.load(ckpt / STATE_FILE, weights_only=True)["session"]["sampler"]["world_size"] == 2

    model = gpt2()
    one = MixlabCallback(tiny_data, "aioli", AIOLI, seq_len=SEQ, eval_windows=4)
    trainer(tmp_path / "one", one, model).train()
    assert r0["drawn"] == [h.drawn.tolist() for h in one.history]
    np.testing.assert_allclose(r0["weights"], [h.weights for h in one.history], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r0["losses"], [h.loss for h in one.history], rtol=1e-6)
    assert not np.allclose(r0["weights"][-1], 1 / 3)


def test_frozen_weighting_model_multiplies_each_samples_loss(tiny_data, tmp_path):
    """A data weighting model trained by `mixlab train` weights each sample of the Trainer's
    micro-batches (frozen): the returned loss is Σ w_i ℓ_i / B with w = b·softmax(score)."""
    from tests.train.conftest import tiny_overrides

    from mixlab.train.config import load_config
    from mixlab.train.loop import train
    from mixlab.weighting import batch_weights, load_net

    run = tmp_path / "dwm-run"
    train(load_config(None, tiny_overrides(tiny_data, [
        "weighting.name='dwm'", "weighting.options.stages=2", "weighting.options.updates_per_stage=8"])), run)
    model = gpt2()
    cb = MixlabCallback(tiny_data, "stratified", seq_len=SEQ, weighting=run)
    returned: list[float] = []
    trainer(tmp_path / "out", cb, model, steps=2, learning_rate=0.0, loss_log=returned).train()
    net, _ = load_net(run, DataDir.open(tiny_data).manifest.tokenizer_sha256, ["a", "b", "c"])
    wrapped = HFCausalLM(model)
    for h, batch in zip(cb.history, replay(tiny_data, cb)):
        with torch.no_grad():
            ell = per_sample_loss(wrapped, batch.tokens).double().numpy()
        for k in range(GA):
            part = slice(k * MICRO, (k + 1) * MICRO)
            with torch.no_grad():
                w = batch_weights(net(batch.tokens[part, :-1]), 1.0).double().numpy()
            assert not np.allclose(w, 1.0)
            np.testing.assert_allclose(returned[h.step * GA + k], (w * ell[part]).sum() / B, rtol=1e-5)
    other = tmp_path / "other"
    from mixlab.data.synthetic import make_synthetic_datadir

    make_synthetic_datadir(other, {"a": 10, "b": 10}, vocab_size=80)
    with pytest.raises(ConfigError, match="different tokenizer"):
        MixlabCallback(other, "stratified", seq_len=SEQ, weighting=run)


def test_logs_carry_the_mixture_and_the_mean_domain_losses_since_the_last_log(tiny_data, tmp_path):
    """on_log adds the latest step's mixture and, per domain, the mean of the per-step domain
    losses since the previous log (re-computed here from the history by hand); attach() puts the
    callback before every other callback, so reporting integrations see these keys."""
    cb = MixlabCallback(tiny_data, "odm", seq_len=SEQ)
    seen: list[dict] = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.append(dict(logs))

    t = trainer(tmp_path / "out", cb, gpt2(), steps=6, logging_steps=3, callbacks=[Reporter(), cb])
    cb.attach(t)
    assert t.callback_handler.callbacks[0] is cb
    t.train()
    assert len(seen) == 2
    for logs, window in zip(seen, (cb.history[0:3], cb.history[3:6])):
        for i, d in enumerate(cb.domains):
            assert logs[f"mixlab/weight/{d}"] == float(window[-1].weights[i])
            vals = [h.domain_losses[i] for h in window if np.isfinite(h.domain_losses[i])]
            # a mean of <= 3 float64 values in another summation order: <= 3 ulp apart.
            assert logs[f"mixlab/train_loss/{d}"] == pytest.approx(sum(vals) / len(vals), rel=1e-12)
