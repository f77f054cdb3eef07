"""FSDP (``train.parallel = "fsdp"``): two processes on CPU with the gloo backend, as torchrun
would run them, against one process and against DDP."""

from __future__ import annotations

import contextlib
import queue as queue_mod
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from mixlab.errors import ConfigError
from mixlab.train.config import load_config
from mixlab.train.distributed import DistInfo
from mixlab.train.loop import TIMING_KEYS, Trainer

from .conftest import metrics_lines, tiny_overrides

# aioli asks for eval losses through the (sharded) model; odd eval window counts make the ranks'
# shares uneven; grad_accum = 2 exercises FSDP's no_sync.
# FSDP and DDP then do the same float operations: each rank accumulates its two micro-batches
# (g0 + g1) locally, the reduce-scatter / all-reduce of two ranks adds the two ranks' sums
# (commutative), and 1/world_size is a power of two; evaluation is the same chunks summed in
# window order (evaluate.mean_losses). So the runs are compared for exact equality. Gradient
# clipping is off because its norm is the one operation whose order differs: on DTensor
# gradients torch sums squares per shard, then across ranks, which moves the clip coefficient by
# an ulp and the run by ~1e-6 after 24 exponentiated mixer updates (measured on AVX2 EPYC).
EXTRA = ["mixer.name='aioli'", "mixer.options.round_steps=12", "mixer.options.lp_rounds=1",
         "mixer.options.lp_steps=1", "mixer.options.eta=1.0", "eval.windows=7",
         "eval.signal_windows=3", "train.grad_accum=2", "checkpoint.every=10", "model.n_layer=2",
         "optim.grad_clip=0"]
FSDP = "train.parallel='fsdp'"
NAN_CALL = 12
"""Training forward that returns NaN: step 5, second micro-batch, after the first one's backward
left unreduced gradients behind."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _nan_at(call: int):
    """Inside the block, the ``call``-th training forward (1-based) returns NaN losses."""
    import mixlab.train.loop as loop

    real, calls = loop.per_sample_loss, {"n": 0}

    def patched(model, tokens, params=None):
        calls["n"] += 1
        out = real(model, tokens, params)
        return out * float("nan") if calls["n"] == call else out

    loop.per_sample_loss = patched
    try:
        yield
    finally:
        loop.per_sample_loss = real


def _worker(rank, world, port, data_dir, out, extra, resume, die_after, nan_call, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with _nan_at(nan_call):
            _train(rank, world, data_dir, out, extra, resume, die_after, queue)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _train(rank, world, data_dir, out, extra, resume, die_after, queue):
    trainer = Trainer(load_config(None, tiny_overrides(data_dir, extra)), out, DistInfo(rank, world, rank))
    if die_after:
        real, calls = trainer.train_step, {"n": 0}

        def dying(plan):
            calls["n"] += 1
            if calls["n"] > die_after:
                raise SystemExit("killed")
            return real(plan)

        trainer.train_step = dying
    try:
        summary = trainer.run(resume=resume)
    except SystemExit:
        summary = None
    queue.put((rank, summary, trainer.session.mixer.state_dict(), trainer.session.sampler.state_dict()))


def _run(data_dir, out, extra, resume=False, die_after=0, nan_call=0, world=2):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, data_dir, out, extra, resume, die_after, nan_call, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = []
    while len(results) < world:
        try:
            results.append(queue.get(timeout=2))
        except queue_mod.Empty:
            # Fail at once when a rank died (the other one would wait for it forever).
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail(f"a rank died: exit codes {[p.exitcode for p in procs]}")
    for p in procs:
        p.join(timeout=60)
        # A simulated kill may end in an abort inside gloo's teardown; only clean runs must exit 0.
        assert p.exitcode == 0 or die_after
    return sorted(results, key=lambda r: r[0])


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


def _assert_files_equal(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_fsdp_matches_ddp_exactly(tiny_data, tmp_path):
    """FSDP and DDP on two ranks are the same run, bit for bit (see EXTRA for why); DDP equals
    one process exactly (test_distributed.py), so FSDP does too."""
    # A NaN half-way through accumulation: the step is skipped on both ranks, which stay equal.
    (_, n0, nmix0, nsamp0), (_, n1, nmix1, nsamp1) = _run(
        tiny_data, tmp_path / "fsdp_nan", [*EXTRA, FSDP], nan_call=NAN_CALL)
    assert nmix0 == nmix1 and nsamp0 == nsamp1 and _strip(n0) == _strip(n1)
    assert n0["nonfinite_steps"] == 1
    # Without the NaN, FSDP and DDP are the same run. (With it they end ~1e-6 apart: after
    # FSDP2 drops its unreduced gradients the runs are no longer the same arithmetic; not
    # pinned down yet, so that pair is not compared.)
    (_, s0, mix0, samp0), (_, s1, mix1, samp1) = _run(tiny_data, tmp_path / "fsdp", [*EXTRA, FSDP])
    assert mix0 == mix1 and samp0 == samp1 and _strip(s0) == _strip(s1)
    (_, ddp, *_), _ = _run(tiny_data, tmp_path / "ddp", EXTRA)
    assert _strip(s0) == _strip(ddp)
    # The mixture really moved, so agreement is not trivial.
    assert max(abs(v - 1 / 3) for v in ddp["weights_final"].values()) > 1e-3
    # Full, unsharded weights in the one-process layout (the tied head stored once), equal to
    # DDP's; the same holds for the optimizer state of the last checkpoint.
    fsdp_w = tmp_path / "fsdp" / "model.safetensors"
    assert "head.weight" not in load_file(str(fsdp_w))
    _assert_files_equal(fsdp_w, tmp_path / "ddp" / "model.safetensors")
    ckpt = "checkpoints/step-0000024"
    state_fsdp = torch.load(tmp_path / "fsdp" / ckpt / "state.pt", weights_only=True)["optimizer"]
    state_ddp = torch.load(tmp_path / "ddp" / ckpt / "state.pt", weights_only=True)["optimizer"]
    assert state_fsdp["param_groups"] == state_ddp["param_groups"]
    assert state_fsdp["state"].keys() == state_ddp["state"].keys()
    for i, s in state_ddp["state"].items():
        for k, v in s.items():
            assert torch.equal(state_fsdp["state"][i][k], v), (i, k)
    # Only rank 0 wrote the run dir.
    assert metrics_lines(tmp_path / "fsdp") == metrics_lines(tmp_path / "ddp")


@pytest.mark.slow
def test_fsdp_kill_and_resume_equals_uninterrupted(tiny_data, tmp_path):
    extra = [*EXTRA, FSDP]
    (_, whole, *_), _ = _run(tiny_data, tmp_path / "whole", extra)
    # Killed after 14 steps (last checkpoint at 10), then resumed with two processes.
    _run(tiny_data, tmp_path / "resume", extra, die_after=14)
    shutil.copytree(tmp_path / "resume", tmp_path / "resume_ddp")
    (_, resumed, *_), _ = _run(tiny_data, tmp_path / "resume", extra, resume=True)
    assert _strip(resumed) == _strip(whole)
    assert load_file(str(tmp_path / "resume" / "model.safetensors")).keys() == load_file(
        str(tmp_path / "whole" / "model.safetensors")).keys()
    _assert_files_equal(tmp_path / "resume" / "model.safetensors", tmp_path / "whole" / "model.safetensors")
    # An FSDP checkpoint is an ordinary one: DDP resumes it (train.parallel may change), and
    # since the two are the same arithmetic (see EXTRA), the result is the same run.
    (_, via_ddp, *_), _ = _run(tiny_data, tmp_path / "resume_ddp", EXTRA, resume=True)
    assert _strip(via_ddp) == _strip(whole)


@pytest.mark.parametrize("mixer", ["dga", "doge", "skillit"])
def test_fsdp_refuses_mixers_that_need_the_whole_model(tiny_data, mixer):
    with pytest.raises(ConfigError, match=rf"mixer '{mixer}' needs .*train.parallel = 'ddp'"):
        load_config(None, tiny_overrides(tiny_data, [f"mixer.name='{mixer}'", FSDP]))
    load_config(None, tiny_overrides(tiny_data, [f"mixer.name='{mixer}'"]))  # fine under DDP


def test_fsdp_refuses_aioli_only_with_branch_probes(tiny_data):
    # Aioli's in-place probes train the sharded model itself; its branch probes copy the whole
    # model, which a shard cannot give: the refusal follows the option, at config time.
    with pytest.raises(ConfigError, match=r"mixer 'aioli' needs .*train.parallel = 'ddp'"):
        load_config(None, tiny_overrides(tiny_data, ["mixer.name='aioli'", "mixer.options.probes='branch'", FSDP]))
    load_config(None, tiny_overrides(tiny_data, ["mixer.name='aioli'", FSDP]))


def test_unknown_parallel_is_a_config_error(tiny_data):
    with pytest.raises(ConfigError, match="train.parallel.*'ddp', 'fsdp'"):
        load_config(None, tiny_overrides(tiny_data, ["train.parallel='zero3'"]))


def test_shard_units_are_the_transformer_blocks():
    from mixlab.model import ModelConfig, build_model
    from mixlab.train.fsdp import shard_units

    gpt = build_model(ModelConfig(n_layer=3, d_model=16), 32, 8)
    assert shard_units(gpt) == list(gpt.blocks)
    pytest.importorskip("transformers")
    hf = build_model(ModelConfig(kind="hf", hf_options={
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 8}), 32, 8)
    assert shard_units(hf) == list(hf.hf.model.layers)


@pytest.mark.slow
def test_fsdp_hf_model_matches_one_process(tiny_data, tmp_path):
    """A Hugging Face GPT-2 (tied embedding and head, decoder layers as FSDP units). The one
    process accumulates the two ranks' micro-batches and clipping is off, so the runs are the
    same arithmetic (see EXTRA) and the weights are compared exactly."""
    pytest.importorskip("transformers")
    extra = ["model.kind='hf'", "train.steps=8", "eval.every=0", "optim.grad_clip=0",
             "model.hf_options={model_type='gpt2', n_embd=16, n_layer=2, n_head=2, n_positions=16, "
             "resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0}", "mixer.name='odm'"]
    _run(tiny_data, tmp_path / "fsdp", [*extra, FSDP])
    one = Trainer(load_config(None, tiny_overrides(tiny_data, [*extra, "train.grad_accum=2"])),
                  tmp_path / "one").run()
    weights = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert "hf.lm_head.weight" not in weights  # stored once, as one process stores it
    _assert_files_equal(tmp_path / "fsdp" / "model.safetensors", tmp_path / "one" / "model.safetensors")
    assert one["steps"] == 8
