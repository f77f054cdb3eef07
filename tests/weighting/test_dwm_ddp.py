"""The data weighting model under two gloo processes on CPU, as torchrun would run them."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mixlab.train.distributed import DistInfo
from mixlab.train.loop import TIMING_KEYS, Trainer

DWM = ["weighting.name='dwm'", "weighting.options.stages=2", "weighting.options.updates_per_stage=5",
       "weighting.options.use_loss=true", "train.steps=16",
       # Exact alignments: finite differences would add ~1e-3 of rounding to the comparison.
       "weighting.options.method='jvp'"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, overrides, out, queue):
    from mixlab.train.config import load_config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = Trainer(load_config(None, overrides), out, DistInfo(rank, world, rank))
        summary = trainer.run()
        # numpy, not tensors: a tensor in the queue is shared memory that dies with this process.
        net = {k: v.numpy().copy() for k, v in trainer.session.weighting.weighter.net.state_dict().items()}
        queue.put((rank, summary, net))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in TIMING_KEYS}


@pytest.mark.slow
def test_two_ranks_hold_the_same_weighting_model_as_one_process(tiny_data, tmp_path):
    """Two ranks of 4 samples = one process with two micro-batches of 4 (the weights are
    normalised per micro-batch, so the partitions match): same weighting model, same LM."""
    # Imported here: the spawned workers re-import this module and cannot import ``tests``.
    from tests.train.conftest import tiny_overrides

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, tiny_overrides(tiny_data, DWM), tmp_path / "ddp", queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=300) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, s0, net0), (_, s1, net1) = results
    assert _strip(s0) == _strip(s1)
    for k in net0:
        assert np.array_equal(net0[k], net1[k]), k
    assert s0["weighting"]["updates"] == 10
    assert any(float(np.abs(v).sum()) > 0 for k, v in net0.items() if k.startswith("head"))

    from mixlab.train.config import load_config

    one = Trainer(load_config(None, tiny_overrides(tiny_data, [*DWM, "train.grad_accum=2"])), tmp_path / "one")
    s_one = one.run()
    # The LM trains on the same bits (test_distributed.py: the accumulated micro-batches are the
    # ranks' slices). What differs is the hypergradient of the weighting model: each rank's
    # alignments and its backward through the small network are summed over ranks, i.e. float32
    # sums in another grouping, relative error ~u = 6e-8 per entry. Adam divides by its own
    # running scale, so 10 updates at weighting lr move a parameter by <= 10 * lr * O(u / 1e-3)
    # (the gradient's relative noise floor): of the order of 1e-7 on entries of order 1 (1 ulp,
    # 1.2e-7, measured). atol 1e-6 / rtol 1e-4 is that bound with a factor of 10 for other CPUs.
    for k, v in one.session.weighting.weighter.net.state_dict().items():
        np.testing.assert_allclose(v.numpy(), net0[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(s_one["test"]["avg_loss"], s0["test"]["avg_loss"], rtol=1e-5)
    assert (tmp_path / "ddp" / "dwm.json").is_file() and (tmp_path / "ddp" / "dwm.safetensors").is_file()
