from __future__ import annotations

from pathlib import Path

import pytest

from mixlab.config import apply_overrides, describe, field_docs, from_dict, parse_override
from mixlab.errors import ConfigError
from mixlab.train.config import TrainConfig, load_config


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'. Did you mean 'steps'\?"):
        from_dict(TrainConfig, {"train": {"stpes": 10}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimm'. Did you mean 'optim'\?"):
        from_dict(TrainConfig, {"optimm": {}})


def test_types_are_checked_and_ints_widen_to_floats():
    cfg = from_dict(TrainConfig, {"optim": {"lr": 1}, "train": {"steps": 5}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        from_dict(TrainConfig, {"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="train.precision: 'fp8' is not one of"):
        from_dict(TrainConfig, {"train": {"precision": "fp8"}})


def test_validation_messages_say_what_to_change():
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        from_dict(TrainConfig, {"train": {"steps": 0}})
    with pytest.raises(ConfigError, match="target.path or target.domain, not both"):
        from_dict(TrainConfig, {"target": {"path": "x", "domain": "y"}})


def test_overrides_parse_toml_literals():
    assert parse_override("train.steps=10") == (["train", "steps"], 10)
    assert parse_override("mixer.name=aioli") == (["mixer", "name"], "aioli")
    assert parse_override("data.domains=['a','b']") == (["data", "domains"], ["a", "b"])
    assert parse_override("mixer.options.weights={a=0.5, b=0.5}")[1] == {"a": 0.5, "b": 0.5}
    out = apply_overrides({"train": {"steps": 1}}, ["train.steps=3", "optim.lr=0.1"])
    assert out == {"train": {"steps": 3}, "optim": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.steps")


def test_load_config_file_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nsteps = 7\n[mixer]\nname = "temperature"\n[mixer.options]\ntau = 3.0\n')
    cfg = load_config(p, ["train.seed=4"])
    assert (cfg.train.steps, cfg.train.seed, cfg.mixer.options) == (7, 4, {"tau": 3.0})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_every_field_is_documented():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory)

    walk(TrainConfig)


def test_describe_round_trips_as_toml():
    import tomllib

    text = describe(TrainConfig)
    assert "# Optimizer steps." in text
    parsed = tomllib.loads(text)
    assert from_dict(TrainConfig, parsed) == TrainConfig()


def test_train_config_files_in_the_repo(tmp_path):
    """configs/small.toml is a train config; configs/demo.toml (a compare config) is refused by
    `mixlab train` with a message that says what to do."""
    root = Path(__file__).parents[1] / "configs"
    cfg = load_config(root / "small.toml", ["weighting.name='dwm'"])
    assert cfg.model.d_model == 64 and cfg.data.dir == "data/builtin" and cfg.weighting.enabled
    with pytest.raises(ConfigError, match=r"compare config \(it has \[demo\], \[mixers\]\).*mixlab compare"):
        load_config(root / "demo.toml")
