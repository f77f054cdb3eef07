import math

import pytest

from mixlab.train.schedule import lr_at


def test_warmup_and_cosine_exact_values():
    kw = {"lr": 1.0, "warmup_steps": 4, "total_steps": 14, "min_lr_ratio": 0.1}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    # The decay runs over steps 4..13; step 9 is 5/9 of the way.
    assert lr_at(13, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 9)))


def test_no_warmup_single_step():
    assert lr_at(0, lr=2.0, warmup_steps=0, total_steps=1, min_lr_ratio=0.5) == 2.0
