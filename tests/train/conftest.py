from __future__ import annotations

import pytest

from mixlab.train.config import load_config


def tiny_overrides(data_dir, out_extra=()) -> list[str]:
    return [
        f"data.dir='{data_dir}'",
        "data.seq_len=16",
        "model.d_model=32",
        "model.n_layer=1",
        "model.n_head=2",
        "train.steps=24",
        "train.batch_size=8",
        "train.log_every=4",
        "train.progress=false",
        "optim.warmup_steps=4",
        "eval.every=8",
        "eval.windows=8",
        "eval.signal_windows=4",
        "eval.test_windows=8",
        *out_extra,
    ]


@pytest.fixture
def tiny_cfg(tiny_data):
    def make(*extra: str):
        return load_config(None, tiny_overrides(tiny_data, extra))

    return make
