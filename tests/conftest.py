"""Shared fixtures. Tests run single-threaded: the machine has 2 cores and is shared."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_data(tmp_path):
    """A 3-domain patterned data dir (vocab 64, 50-token documents); domain 'c' is small."""
    from mixlab.data.synthetic import make_synthetic_datadir

    return make_synthetic_datadir(tmp_path / "data", {"a": 40, "b": 40, "c": 10}, vocab_size=64)
