"""The data weighting model: start, schedule, training against corrupted data, files, resume."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.train.conftest import assert_resume_identical, tiny_overrides

from mixlab.data.format import DataDir
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.errors import CheckpointError, ConfigError
from mixlab.model import per_sample_loss
from mixlab.train.config import load_config
from mixlab.train.loop import Trainer, load_run_model, train
from mixlab.weighting import (
    MODEL_FILE,
    DataWeighter,
    DWMConfig,
    WeighterContext,
    batch_weights,
    load_net,
    save_net,
)
from mixlab.weighting.dwm import canonical_safetensors
from mixlab.weighting.model import NetSpec, WeightingNet, standardise


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture
def corrupted_data(tmp_path):
    """'clean' patterned documents and 'noisy': the same kind of documents, tokens shuffled."""
    return make_synthetic_datadir(
        tmp_path / "corrupted", {"clean": 40, "noisy": 40}, vocab_size=64,
        shuffled_copies={"noisy": "clean"},
    )


def dwm_cfg(data, *extra):
    return load_config(None, tiny_overrides(data, ["weighting.name='dwm'", *extra]))


def test_weights_start_uniform_with_mean_one():
    spec = NetSpec(vocab_size=64, n_domains=3, use_domain=True, use_loss=True, use_progress=True)
    net = WeightingNet(spec)
    tokens = torch.randint(0, 64, (6, 17))
    scores = net(tokens, torch.tensor([0, 1, 2, 0, 1, 2]), standardise(torch.rand(6)), 0.3)
    assert torch.equal(scores, torch.zeros(6))
    assert torch.equal(batch_weights(scores, 1.0), torch.ones(6))
    w = batch_weights(torch.randn(8) * 3, 0.5, group=4)
    assert torch.allclose(w.reshape(2, 4).mean(dim=1), torch.ones(2))
    assert bool((w >= 0).all())


def test_standardise_groups_and_constant_group():
    x = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    z = standardise(x, 3)
    assert torch.allclose(z[:3], torch.tensor([-1.2247449, 0.0, 1.2247449]))
    assert torch.equal(z[3:], torch.zeros(3))


def test_stage_schedule():
    ctx = WeighterContext(domains=["a"], vocab_size=64, tokenizer_sha256="x", total_steps=10,
                          batch_size=4, seq_len=16, seed=0, device=torch.device("cpu"))
    w = DataWeighter(DWMConfig(stages=3, updates_per_stage=2), ctx)
    assert [w.stage(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert [s for s in range(10) if w.trains_at(s)] == [0, 1, 3, 4, 6, 7]
    assert w.training_updates == 6


def test_config_errors(tiny_data):
    with pytest.raises(ConfigError, match="frozen"):
        dwm_cfg(tiny_data, "weighting.options.frozen=true")
    with pytest.raises(ConfigError, match="needs a target"):
        Trainer(dwm_cfg(tiny_data, "weighting.options.validation='target'"), tiny_data.parent / "run")
    with pytest.raises(ConfigError, match="weightin"):
        dwm_cfg(tiny_data, "weighting.stagez=3")
    with pytest.raises(ConfigError, match="no weighting model"):
        Trainer(dwm_cfg(tiny_data, f"weighting.options.load='{tiny_data}'"), tiny_data.parent / "run")


def test_ranks_clean_above_corrupted(corrupted_data, tmp_path):
    """Bi-level training against a clean validation set (the 'clean' target) teaches the
    weighting model to rank held-out clean windows above shuffled ones (measured AUC 0.98-1.0
    over seeds 0-2 with the LM's loss as an input; tokens alone: 0.91-0.99 with 100 updates)."""
    cfg = dwm_cfg(corrupted_data, "target.domain='clean'", "train.steps=80", "weighting.options.stages=4",
                  "weighting.options.updates_per_stage=15", "weighting.options.use_loss=true")
    summary = train(cfg, tmp_path / "run")
    assert summary["weighting"]["updates"] == 60
    data = DataDir.open(corrupted_data)
    net, _ = load_net(tmp_path / "run", data.manifest.tokenizer_sha256, ["clean", "noisy"])
    lm = load_run_model(tmp_path / "run").eval()

    def windows(domain: str) -> torch.Tensor:
        split = data.split(domain, "test")
        return torch.from_numpy(split.windows(np.arange(split.n_windows(17)), 17).astype(np.int64))

    clean, noisy = windows("clean"), windows("noisy")
    both = torch.cat([clean, noisy])
    with torch.no_grad():
        scores = net(both[:, :-1], losses=standardise(per_sample_loss(lm, both))).numpy()
    assert auc(scores[: len(clean)], scores[len(clean):]) >= 0.9
    stages = json.loads((tmp_path / "run" / "dwm.json").read_text())["stages"]
    last = stages[-1]["mean_weight"]
    assert last["clean"] > 1.2 > 0.8 > last["noisy"]
    assert stages[-1]["highest"][0]["domain"] == "clean"
    assert stages[-1]["lowest"][0]["domain"] == "noisy"
    assert isinstance(stages[-1]["highest"][0]["text"], str)


def test_transfer_to_a_bigger_lm_and_tokenizer_check(tiny_data, tmp_path):
    small = tmp_path / "small"
    train(dwm_cfg(tiny_data, "weighting.options.stages=2", "weighting.options.updates_per_stage=6"), small)
    cfg = dwm_cfg(tiny_data, f"weighting.options.load='{small}'", "weighting.options.frozen=true",
                  "model.d_model=64", "model.n_layer=2")
    trainer = Trainer(cfg, tmp_path / "big")
    saved, _ = load_net(small / "dwm.safetensors", trainer.data.manifest.tokenizer_sha256, trainer.domains)
    loaded = trainer.session.weighting.weighter.net
    for k, v in saved.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert any(float(v.abs().sum()) > 0 for k, v in saved.state_dict().items() if k.startswith("head"))
    summary = trainer.run()
    assert summary["weighting"]["updates"] == 0 and summary["weighting"]["frozen"]
    after, _ = load_net(tmp_path / "big", trainer.data.manifest.tokenizer_sha256, trainer.domains)
    for k, v in saved.state_dict().items():
        assert torch.equal(v, after.state_dict()[k]), k
    # Keep training it instead: the loaded model moves.
    moved = train(dwm_cfg(tiny_data, f"weighting.options.load='{small}'", "weighting.options.stages=1",
                          "weighting.options.updates_per_stage=3"), tmp_path / "cont")
    assert moved["weighting"]["updates"] == 3
    # Another tokenizer (vocab 80): refused with a clear message.
    other = make_synthetic_datadir(tmp_path / "other", {"a": 10, "b": 10}, vocab_size=80)
    with pytest.raises(ConfigError, match="different tokenizer"):
        Trainer(dwm_cfg(other, f"weighting.options.load='{small}'"), tmp_path / "x")


def test_composes_with_a_dynamic_mixer(tiny_data, tmp_path):
    cfg = dwm_cfg(tiny_data, "mixer.name='odm'", "weighting.options.stages=2", "weighting.options.updates_per_stage=4",
                  "weighting.options.method='fd'")
    summary = train(cfg, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert all("weighting" in r and "weights" in r for r in train_recs)
    assert len({tuple(r["weights"].values()) for r in train_recs}) > 1
    assert summary["weighting"]["updates"] == 8
    for r in train_recs:
        means = [v for v in r["weighting"]["mean_weight"].values() if v is not None]
        assert all(np.isfinite(means)) and all(v >= 0 for v in means)


def test_resume_is_bit_identical(tiny_data, tmp_path):
    extra = ["checkpoint.every=7", "weighting.options.stages=3", "weighting.options.updates_per_stage=4",
             "weighting.options.use_loss=true", "weighting.options.use_progress=true"]
    assert_resume_identical(lambda: dwm_cfg(tiny_data, *extra), tmp_path, kill_after=17)
    assert (tmp_path / "cut" / "dwm.json").read_text() == (tmp_path / "full" / "dwm.json").read_text()
    sha = DataDir.open(tiny_data).manifest.tokenizer_sha256
    (a, meta_a), (b, meta_b) = (load_net(tmp_path / r, sha, ["a", "b", "c"]) for r in ("cut", "full"))
    assert meta_a == meta_b
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # Equal model and metadata, so equal files: a hash of the run's outputs identifies it.
    assert (tmp_path / "cut" / MODEL_FILE).read_bytes() == (tmp_path / "full" / MODEL_FILE).read_bytes()


def test_saved_bytes_do_not_depend_on_dict_order(tmp_path):
    """safetensors writes its metadata in hash order, which changes from call to call (measured:
    five saves of one model, five key orders); the saved bytes must not."""
    net = WeightingNet(NetSpec(vocab_size=64, n_domains=2))
    torch.nn.init.normal_(net.head.weight, generator=torch.Generator().manual_seed(0))
    files = []
    for i in range(5):
        save_net(net, tmp_path / f"{i}.safetensors", "sha", ["a", "b"], 3)
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
    meta = {"format": "1", "spec": "{}", "domains": "[]", "updates": "3", "tokenizer_sha256": "x"}
    tensors = {k: v.detach().clone() for k, v in net.state_dict().items()}
    forward = canonical_safetensors(tensors, meta)
    backward = canonical_safetensors(dict(reversed(list(tensors.items()))), dict(reversed(list(meta.items()))))
    assert forward == backward
    # Any safetensors reader reads it back: the same tensors and metadata.
    (tmp_path / "c.safetensors").write_bytes(forward)
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
    back = load_file(str(tmp_path / "c.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    # Its header is canonical JSON, padded to 8 bytes as safetensors pads it.
    (n,) = struct.unpack("<Q", forward[:8])
    header = forward[8 : 8 + n]
    assert n % 8 == 0
    assert header.rstrip(b" ") == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()


def test_a_file_with_a_head_bias_loads_with_the_same_weights(tmp_path):
    net = WeightingNet(NetSpec(vocab_size=64, n_domains=2))
    torch.nn.init.normal_(net.head.weight)
    save_net(net, tmp_path / "dwm.safetensors", "sha", ["a", "b"], 3)
    tensors = load_file(str(tmp_path / "dwm.safetensors"))
    with safe_open(str(tmp_path / "dwm.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file({**tensors, "head.bias": torch.tensor([0.7])}, str(tmp_path / "old.safetensors"), metadata=meta)
    old, _ = load_net(tmp_path / "old.safetensors", "sha", ["a", "b"])
    tokens = torch.randint(0, 64, (5, 16))
    with torch.no_grad():
        assert torch.equal(batch_weights(old(tokens), 1.0), batch_weights(net(tokens), 1.0))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_net(tmp_path / "bad.safetensors", "sha", ["a", "b"])


def test_max_weight_bounds_the_weights_and_keeps_mean_and_order():
    scores = torch.tensor([6.0, 0.0, -1.0, 0.5, 3.0, 3.0, 3.0, -2.0])
    free = batch_weights(scores, 1.0, group=4)
    capped = batch_weights(scores, 1.0, group=4, max_weight=2.0)
    assert float(free[:4].max()) > 3.9  # nearly the whole first group on one sample
    assert float(capped.max()) == pytest.approx(2.0)
    assert torch.allclose(capped.reshape(2, 4).mean(dim=1), torch.ones(2))
    assert torch.equal(torch.argsort(capped[:4]), torch.argsort(free[:4]))
    # A group already under the bound is left exactly as it was.
    assert torch.equal(capped[4:], free[4:])
    with pytest.raises(ConfigError, match="max_weight"):
        DWMConfig(max_weight=0.5)
