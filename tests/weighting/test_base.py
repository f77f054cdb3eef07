"""The weighter extension point: registry, ``[weighting.options]``, the old flat layout,
capabilities, and a weighter registered here driving a real run through the protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tests.train.conftest import assert_resume_identical, tiny_overrides

from mixlab.cli import main
from mixlab.config import from_dict, to_dict
from mixlab.data.format import DataDir
from mixlab.errors import ConfigError
from mixlab.train.config import TrainConfig, load_config
from mixlab.train.loop import Trainer
from mixlab.train.session import MixingSession, RunView
from mixlab.weighting import (
    WEIGHTERS,
    DWMConfig,
    Weighter,
    WeighterContext,
    WeightingConfig,
    WeightingNet,
    build_weighter,
    register_weighter,
    save_net,
)
from mixlab.weighting.dwm import spec_from_config

TOY = "toy-test"
FACTORS = {"a": 2.0, "b": 0.0, "c": 1.0}
"""The toy weighter's weight of each domain's samples (the tiny data's domains)."""


@dataclass
class ToyConfig:
    favour: str = "a"
    """Domain whose samples count twice."""
    drop: str = "b"
    """Domain whose samples do not count."""
    every: int = 2
    """Update at every this many steps."""

    def __post_init__(self) -> None:
        if self.favour == self.drop:
            raise ConfigError("weighting.options.favour and weighting.options.drop must differ.")


class ToyWeighter(Weighter):
    """2 for one domain, 0 for another, 1 for the rest; counts its updates."""

    Config = ToyConfig
    needs = frozenset({"branches"})  # not true of it: lets a test see the capability check

    def __init__(self, config: ToyConfig, ctx: WeighterContext):
        super().__init__(config, ctx)
        self.updates = 0
        self.seen: list[tuple[int, int, int]] = []

    def weights(self, step, tokens, domains, losses):
        w = torch.ones(domains.shape[0])
        w[domains == self.ctx.domains.index(self.config.favour)] = 2.0
        w[domains == self.ctx.domains.index(self.config.drop)] = 0.0
        return w

    def trains_at(self, step: int) -> bool:
        return step % self.config.every == 0

    def update(self, step, signals) -> bool:
        self.updates += 1
        self.seen.append((signals.step, signals.tokens.shape[0], signals.micro))
        return True

    def report(self, step: int) -> dict[str, Any]:
        return {"updates": self.updates}

    def summary(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])


@pytest.fixture
def toy():
    register_weighter(TOY)(ToyWeighter)
    yield ToyWeighter
    WEIGHTERS.pop(TOY)


def toy_cfg(data, *extra: str) -> TrainConfig:
    return load_config(None, tiny_overrides(data, [f"weighting.name='{TOY}'", *extra]))


# ---------------------------------------------------------------------------------------------
# registry and options


def test_unknown_name_lists_the_known_weighters():
    with pytest.raises(ConfigError, match=r"weighting.name 'dwn' is not a weighter. Did you mean 'dwm'\? "
                                          r"Available: none, dwm\."):
        load_config(None, ["weighting.name=dwn"])


def test_unknown_option_names_the_key_and_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["weighting.name=dwm", "weighting.options.stagez=3"])
    msg = str(e.value)
    assert "weighting.options.stagez is not an option of weighter 'dwm'. Did you mean 'stages'?" in msg
    assert "Known options: stages, updates_per_stage, tau," in msg and msg.count("\n") == 0


def test_options_are_validated_against_the_weighters_config(toy):
    cfg = load_config(None, ["weighting.name=dwm", "weighting.options.stages=3", "weighting.options.tau=2"])
    assert cfg.weighting == WeightingConfig(name="dwm", options={"stages": 3, "tau": 2})
    assert cfg.weighting.weighter_config() == DWMConfig(stages=3, tau=2.0)
    with pytest.raises(ConfigError, match="weighting.options.stages: expected an integer"):
        load_config(None, ["weighting.name=dwm", "weighting.options.stages='x'"])
    with pytest.raises(ConfigError, match="weighting.options.max_weight must be 0"):
        load_config(None, ["weighting.name=dwm", "weighting.options.max_weight=0.5"])
    # A registered weighter's own Config and its own checks.
    with pytest.raises(ConfigError, match="favour and weighting.options.drop must differ"):
        load_config(None, [f"weighting.name={TOY}", "weighting.options.drop=a"])
    with pytest.raises(ConfigError, match="Known options: favour, drop, every"):
        load_config(None, [f"weighting.name={TOY}", "weighting.options.stages=3"])
    with pytest.raises(ConfigError, match="set but weighting.name = 'none'"):
        load_config(None, ["weighting.options.stages=3"])


def test_cli_names_a_bad_option_in_one_line(capsys):
    assert main(["train", "--set", "weighting.name=dwm", "--set", "weighting.options.stagez=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "weighting.options.stagez is not an option of weighter 'dwm'" in err and "\n" not in err


def test_print_config_round_trips_weighting_options(tmp_path, capsys):
    sets = ["weighting.name=dwm", "weighting.options.stages=3"]
    assert main(["train", "--print-config", *[a for s in sets for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[weighting.options]") == 1 and "\nstages = 3\n" in printed
    path = tmp_path / "printed.toml"
    path.write_text(printed, encoding="utf-8")
    assert load_config(path) == load_config(None, sets)


# ---------------------------------------------------------------------------------------------
# the flat layout of earlier versions


def test_flat_keys_move_under_options():
    flat = load_config(None, ["weighting.name=dwm", "weighting.stages=3", "weighting.use_loss=true"])
    assert flat.weighting == WeightingConfig(name="dwm", options={"stages": 3, "use_loss": True})
    with pytest.raises(ConfigError, match="weighting.stages and weighting.options.stages are both set"):
        load_config(None, ["weighting.name=dwm", "weighting.stages=3", "weighting.options.stages=4"])
    with pytest.raises(ConfigError, match="weighting.options.stagez is not an option"):
        load_config(None, ["weighting.name=dwm", "weighting.stagez=3"])


def test_config_toml_of_an_old_run_still_loads():
    """Every run dir written before weighters had options holds all of DWM's fields flat under
    [weighting] (name 'none' in most): they load, and configure nothing there."""
    old_fields = {"stages": 5, "updates_per_stage": 10, "tau": 1.0, "max_weight": 0.0, "lr": 0.003,
                  "lookahead_lr": 0.0, "precondition": False, "method": "fd", "validation": "auto",
                  "val_batch": 0, "d_embed": 32, "kernel": 3, "hidden": 64, "max_tokens": 0,
                  "use_domain": False, "use_loss": False, "use_progress": False, "load": "",
                  "frozen": False, "snippets": 3}
    none = from_dict(TrainConfig, {"weighting": {"name": "none", **old_fields}})
    assert none.weighting == WeightingConfig()
    dwm = from_dict(TrainConfig, {"weighting": {"name": "dwm", **old_fields}})
    assert dwm.weighting.options == old_fields and dwm.weighting.weighter_config() == DWMConfig()
    # and the new layout round-trips through to_dict, as run dirs now write it
    assert from_dict(TrainConfig, to_dict(dwm)) == dwm
    with pytest.raises(ConfigError, match="unknown config key 'weighting.stagez'"):
        from_dict(TrainConfig, {"weighting": {"name": "none", "stagez": 3}})


# ---------------------------------------------------------------------------------------------
# capabilities


def test_a_driver_without_full_model_refuses_dwm_unless_frozen(tiny_data, tmp_path):
    data = DataDir.open(tiny_data)
    view = RunView(model=torch.nn.Linear(1, 1), provides=frozenset({"branches"}))
    cfg = load_config(None, tiny_overrides(tiny_data, ["weighting.name=dwm"]))
    with pytest.raises(ConfigError, match=r"weighting.name = 'dwm' needs the whole, unsharded parameters "
                                          r".*weighting.options.frozen = true"):
        MixingSession(cfg, view, data)
    # A frozen weighting model only scores samples: the same driver takes it.
    path = tmp_path / "dwm.safetensors"
    save_net(WeightingNet(spec_from_config(DWMConfig(), data.vocab_size, 3)), path,
             data.manifest.tokenizer_sha256, data.domains, 0)
    frozen = load_config(None, tiny_overrides(tiny_data, [
        "weighting.name=dwm", f"weighting.options.load='{path}'", "weighting.options.frozen=true"]))
    session = MixingSession(frozen, view, data)
    assert session.weighting is not None and not session.weighting.trains_at(0)


def test_a_registered_weighters_needs_are_checked(tiny_data, toy):
    data = DataDir.open(tiny_data)
    view = RunView(model=torch.nn.Linear(1, 1), provides=frozenset({"full_model"}))
    with pytest.raises(ConfigError, match=f"weighting.name = '{TOY}' needs copies of the model"):
        MixingSession(toy_cfg(tiny_data), view, data)


# ---------------------------------------------------------------------------------------------
# a registered weighter in a real run


def test_toy_weighter_weights_the_loss_the_session_backpropagates(tiny_data, tmp_path, toy):
    """The loss of every micro-batch is Σ_i w(d_i) ℓ_i / b with the toy's weights, computed here
    from the batch's domains; the toy's hooks run at the steps it asked for."""
    trainer = Trainer(toy_cfg(tiny_data, "train.grad_accum=2"), tmp_path / "run")
    session = trainer.session
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    loss_fn = session.loss

    def spy(st, k, losses, token_losses=None):
        out = loss_fn(st, k, losses, token_losses)
        sl = slice(k * st.micro, (k + 1) * st.micro)
        names = [session.domains[int(d)] for d in st.batch.domains[sl]]
        expected = sum(FACTORS[n] * float(x) for n, x in zip(names, losses.detach())) / st.batch.tokens.shape[0]
        seen.append((out.detach(), torch.tensor(expected, dtype=out.dtype)))
        return out

    session.loss = spy
    summary = trainer.run()
    assert len(seen) == 24 * 2
    for got, want in seen:
        torch.testing.assert_close(got, want)
    assert summary["weighting"] == {"name": TOY, "updates": 12}
    weighter = session.weighting.weighter
    assert weighter.seen[:2] == [(0, 8, 4), (2, 8, 4)]


def test_toy_weighter_state_resumes(tiny_data, tmp_path, toy):
    summary = assert_resume_identical(lambda: toy_cfg(tiny_data, "checkpoint.every=5",
                                                      "weighting.options.every=3"), tmp_path, 11)
    assert summary["weighting"] == {"name": TOY, "updates": 8}


def test_build_weighter_directly():
    ctx = WeighterContext(domains=["a", "b"], vocab_size=64, tokenizer_sha256="x", total_steps=4,
                          batch_size=4, seq_len=8, seed=0, device=torch.device("cpu"),
                          target_probe=torch.zeros(3, 9, dtype=torch.long))
    w = build_weighter("dwm", {"stages": 2, "updates_per_stage": 1}, ctx)
    assert [s for s in range(4) if w.trains_at(s)] == [0, 2]
    assert w.summary()["validation"] == "target"  # 'auto' with a target
    ones = w.weights(0, torch.zeros(4, 9, dtype=torch.long), torch.tensor([0, 1, 0, 1]), torch.ones(4))
    assert torch.equal(ones, torch.ones(4))  # a new model starts uniform


def test_dwm_state_of_a_checkpoint_written_before_weighters_loads(tiny_data):
    """Checkpoints written before the weighter protocol kept DWM's validation stream beside its
    state ({"weighter": ..., "val_sampler": ...}); they load into the same state."""
    data = DataDir.open(tiny_data)
    cfg = load_config(None, tiny_overrides(tiny_data, ["weighting.name=dwm", "weighting.options.validation='val'"]))
    first = MixingSession(cfg, RunView(model=torch.nn.Linear(1, 1)), data).weighting
    first.weighter.val_tokens(0)  # move the stream, so a fresh one would differ
    state = first.state_dict()["weighter"]
    old = {"weighter": {k: v for k, v in state.items() if k != "val_sampler"}, "val_sampler": state["val_sampler"]}
    second = MixingSession(cfg, RunView(model=torch.nn.Linear(1, 1)), data).weighting
    second.load_state_dict(old)
    assert torch.equal(second.weighter.val_tokens(1), first.weighter.val_tokens(1))


def test_a_checkpoint_written_in_the_flat_layout_resumes(tiny_data, tmp_path):
    """A run interrupted before the upgrade resumes after it: its checkpoint's config (DWM's
    fields flat under [weighting]) is read in the current layout before it is compared."""
    import json

    from mixlab.errors import CheckpointError
    from mixlab.train.checkpoint import load_checkpoint

    cfg = load_config(None, tiny_overrides(tiny_data, ["train.steps=4", "checkpoint.every=2"]))
    run = tmp_path / "r"
    Trainer(cfg, run).run()
    (ckpt,) = sorted((run / "checkpoints").iterdir())[:1]
    meta = json.loads((ckpt / "meta.json").read_text())
    old_fields = {"stages": 5, "updates_per_stage": 10, "tau": 1.0, "lr": 0.003, "method": "fd",
                  "load": "", "frozen": False}
    meta["config"]["weighting"] = {"name": "none", **old_fields}  # as mixlab wrote it before
    (ckpt / "meta.json").write_text(json.dumps(meta))
    load_checkpoint(ckpt, to_dict(cfg))  # no difference: it resumes
    other = to_dict(load_config(None, tiny_overrides(tiny_data, ["train.steps=4", "mixer.name=odm"])))
    with pytest.raises(CheckpointError, match="mixer.name: checkpoint has 'stratified', config has 'odm'"):
        load_checkpoint(ckpt, other)  # a real difference is still refused
