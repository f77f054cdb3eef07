"""metrics.jsonl and the trackers (mixlab.train.trackers): bytes, tags, and what each tracker
holds once the run is closed, read back through the tracker's own files or client.

Everything runs offline: W&B in offline mode, MLflow on SQLite files under tmp_path, telemetry
and error reporting off.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mixlab.errors import ConfigError, Stopped
from mixlab.train.config import LogConfig, load_config
from mixlab.train.trackers import STATE_FILE, MetricsWriter, scalars

TRAIN = {
    "loss": 2.5,
    "domain_loss": {"code": 2.25, "legal": None},
    "kind": "train",
    "step": 4,
    "tokens": 512,
    "lr": 0.001,
    "weights": {"code": 0.75, "legal": 0.25},
    "phase": "update",
    "nonfinite": 0,
    "tokens_per_s": 100.5,
    "elapsed_s": 5.0,
    "loss_weights": {"code": 1.5, "legal": 0.5},
    "mixer": {"updates": 3, "alignment": [0.1, None], "A": [[1.0, 0.0], [0.0, 1.0]],
              "eps": 0.125, "converged": True},
    "weighting": {"stage": 1, "updates": 2, "hyper_norm": None,
                  "mean_weight": {"code": 1.25, "legal": None}},
}
TRAIN_TAGS = [
    ("train/loss", 2.5),
    ("train/domain_loss/code", 2.25),
    ("train/tokens", 512.0),
    ("train/lr", 0.001),
    ("train/weights/code", 0.75),
    ("train/weights/legal", 0.25),
    ("train/nonfinite", 0.0),
    ("train/tokens_per_s", 100.5),
    ("train/elapsed_s", 5.0),
    ("train/loss_weights/code", 1.5),
    ("train/loss_weights/legal", 0.5),
    ("train/mixer/updates", 3.0),
    ("train/mixer/eps", 0.125),
    ("train/weighting/stage", 1.0),
    ("train/weighting/updates", 2.0),
    ("train/weighting/mean_weight/code", 1.25),
]
EVAL = {
    "kind": "eval", "step": 4, "tokens": 512, "split": "val",
    "loss": {"code": 2.0, "legal": 3.0}, "ppl": {"code": 7.5, "legal": 20.0},
    "avg_loss": 2.5, "avg_ppl": 13.75, "target_loss": None,
}
EVAL_TAGS = [
    ("eval/tokens", 512.0),
    ("eval/loss/code", 2.0),
    ("eval/loss/legal", 3.0),
    ("eval/ppl/code", 7.5),
    ("eval/ppl/legal", 20.0),
    ("eval/avg_loss", 2.5),
    ("eval/avg_ppl", 13.75),
]
LATER = {"kind": "train", "step": 8, "loss": 2.0, "weights": {"code": 0.5, "legal": 0.5}}
LATER_TAGS = [("train/loss", 2.0), ("train/weights/code", 0.5), ("train/weights/legal", 0.5)]
CONFIG = {"optim": {"lr": 0.001, "beta1": 0.9}, "mixer": {"name": "aioli", "options": {}}}


def expected_by_step(*groups: tuple[int, list[tuple[str, float]]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for step, tags in groups:
        out.setdefault(step, {}).update(tags)
    return out


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """No tracker reaches a server, reads the user's settings or sends telemetry."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


def write_run(run: Path, log: LogConfig, records: list[dict], **kw) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with MetricsWriter(run / "metrics.jsonl", True, log, **kw) as metrics:
        for rec in records:
            metrics.write(rec)


# ------------------------------------------------------------------------- metrics.jsonl


def test_metrics_jsonl_bytes_are_json_dumps_lines_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n', encoding="utf-8")  # a resumed run's lines
    nan_rec = {"kind": "train", "step": 12, "loss": float("nan"), "note": "é"}
    metrics = MetricsWriter(path, True, LogConfig())
    for rec in (TRAIN, EVAL, nan_rec):
        metrics.write(rec)
    metrics.close()
    want = '{"kind": "train", "step": 1}\n' + "".join(json.dumps(r) + "\n" for r in (TRAIN, EVAL, nan_rec))
    assert path.read_bytes() == want.encode("utf-8")
    assert not (tmp_path / STATE_FILE).exists()  # no tracker, nothing to resume


def test_a_disabled_writer_writes_nothing(tmp_path):
    metrics = MetricsWriter(tmp_path / "metrics.jsonl", False, LogConfig())
    metrics.write(TRAIN)
    metrics.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- scalars


def test_scalars_tags_and_values():
    assert scalars(TRAIN) == TRAIN_TAGS
    assert scalars(EVAL) == EVAL_TAGS
    assert scalars({"kind": "train", "step": 3}) == []


# ------------------------------------------------------------------------------ missing


@pytest.mark.parametrize(
    ("key", "module", "line"),
    [
        ("tensorboard", "torch.utils.tensorboard",
         "log.tensorboard = true needs TensorBoard: pip install 'mixlab[tensorboard]'."),
        ("wandb", "wandb", "log.wandb = true needs wandb: pip install 'mixlab[wandb]'."),
        ("mlflow", "mlflow", "log.mlflow = true needs MLflow: pip install 'mixlab[mlflow]'."),
    ],
)
@pytest.mark.parametrize("enabled", [True, False])  # every rank refuses, not only the main one
def test_missing_package_is_one_config_error_naming_the_extra(tmp_path, monkeypatch, key, module,
                                                              line, enabled):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ConfigError) as err:
        MetricsWriter(tmp_path / "metrics.jsonl", enabled, LogConfig(**{key: True}))
    assert str(err.value) == line
    assert list(tmp_path.iterdir()) == []


def test_sqlite_store_without_its_database_layer_names_the_extra(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match=r"needs sqlalchemy: pip install 'mixlab\[mlflow\]'\.$"):
        MetricsWriter(tmp_path / "metrics.jsonl", True, LogConfig(mlflow=True))


# ------------------------------------------------------------------------------- config


def test_log_config_keys_and_refusals():
    cfg = load_config(None, ["log.wandb=true", "log.wandb_mode='offline'", "log.mlflow=true",
                             "log.mlflow_uri='sqlite:///x.db'", "log.mlflow_experiment='exp'"])
    assert (cfg.log.wandb, cfg.log.wandb_mode, cfg.log.mlflow) == (True, "offline", True)
    assert (cfg.log.mlflow_uri, cfg.log.mlflow_experiment, cfg.log.tensorboard) == ("sqlite:///x.db", "exp", False)
    assert load_config(None, []).log.wandb_mode is None
    with pytest.raises(ConfigError, match="'cloud' is not one of 'online', 'offline', 'disabled'"):
        load_config(None, ["log.wandb_mode='cloud'"])
    with pytest.raises(ConfigError, match="Did you mean 'wandb_project'"):
        load_config(None, ["log.wandb_projet='x'"])
    with pytest.raises(ConfigError, match="log.wandb: expected true or false"):
        load_config(None, ["log.wandb='yes'"])
    with pytest.raises(ConfigError, match="log.wandb_mode must be one of"):
        LogConfig(wandb_mode="cloud")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="log.wandb_project has leading or trailing spaces"):
        LogConfig(wandb_project=" team ")


# --------------------------------------------------------------------------- tensorboard


def test_tensorboard_events_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(tmp_path / "r", LogConfig(tensorboard=True), [TRAIN, EVAL, LATER])
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    want = expected_by_step((4, TRAIN_TAGS), (4, EVAL_TAGS), (8, LATER_TAGS))
    got: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for ev in acc.Scalars(tag):
            got.setdefault(ev.step, {})[tag] = ev.value
    assert got.keys() == want.keys()
    for step in want:  # event files hold float32
        assert got[step] == pytest.approx(want[step], rel=1e-6)


# --------------------------------------------------------------------------------- wandb


def wandb_records(run_file: Path) -> list:
    """The records of a W&B ``run-ID.wandb`` file: a 7-byte header (":W&B", magic, version),
    then LevelDB-log chunks (crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) in 32 KiB
    blocks, each whole record a ``wandb_internal_pb2.Record``. wandb has no public reader of
    offline runs, so this one is ours; a format change shows up here as a failing parse."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the block's end
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_run(folder: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    """(the run record's fields, history by step) of one offline run folder."""
    (run_file,) = folder.glob("run-*.wandb")
    # wandb.finish() returns before wandb's service process has written the file's last
    # block: wait for the run's closing "exit" record.
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after 30 s"
        time.sleep(0.05)
    info: dict = {}
    history: dict[int, dict[str, float]] = {}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            info = {"id": rec.run.run_id, "project": rec.run.project,
                    "name": rec.run.display_name, "config": config}
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = row.pop("_step")
            history.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return info, history


def test_wandb_offline_run_holds_the_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    run = tmp_path / "runs" / "aioli-s0"
    write_run(run, LogConfig(wandb=True), [TRAIN, EVAL], config=CONFIG)
    (first,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    info, history = wandb_run(first)
    assert info["name"] == "aioli-s0" and info["project"] == "mixlab"
    assert info["config"]["optim"] == {"lr": 0.001, "beta1": 0.9}
    assert history == expected_by_step((4, TRAIN_TAGS), (4, EVAL_TAGS))
    saved = json.loads((run / STATE_FILE).read_text())
    assert saved["wandb"]["id"] == info["id"]

    # Resumed: the same W&B run id (offline: a second folder, merged by `wandb sync`).
    write_run(run, LogConfig(wandb=True, wandb_project="proj"), [LATER], config=CONFIG, resumed=True)
    (second,) = set((tmp_path / "wb" / "wandb").glob("offline-run-*")) - {first}
    info2, history2 = wandb_run(second)
    assert info2["id"] == info["id"]
    assert history2 == expected_by_step((8, LATER_TAGS))


def test_wandb_mode_in_config_wins_over_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # Online with no API key would fail; log.wandb_mode = 'offline' must win over $WANDB_MODE.
    monkeypatch.setenv("WANDB_MODE", "online")
    run = tmp_path / "r"
    write_run(run, LogConfig(wandb=True, wandb_mode="offline"), [LATER])
    (folder,) = (run / "wandb").glob("offline-run-*")  # no $WANDB_DIR: under the run dir
    assert wandb_run(folder)[1] == expected_by_step((8, LATER_TAGS))


# -------------------------------------------------------------------------------- mlflow


def mlflow_metrics(client, run_id: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(m.step, {})[key] = m.value
    return out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # sqlalchemy on MLflow's own code
def test_mlflow_default_store_holds_the_scalars_and_resumes_the_same_run(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "aioli-s0"
    write_run(run, LogConfig(mlflow=True), [TRAIN, EVAL], config=CONFIG)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixlab")
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_name == "aioli-s0" and found.info.status == "FINISHED"
    assert found.data.params == {"optim.lr": "0.001", "optim.beta1": "0.9", "mixer.name": "aioli",
                                 "mixer.options": "{}"}
    assert mlflow_metrics(client, found.info.run_id) == expected_by_step((4, TRAIN_TAGS), (4, EVAL_TAGS))
    # The default store keeps artifacts in the run dir too, not in ./mlruns of the working dir.
    assert exp.artifact_location == (run / "mlartifacts").resolve().as_uri()

    write_run(run, LogConfig(mlflow=True), [LATER], config=CONFIG, resumed=True)
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    assert mlflow_metrics(client, found.info.run_id) == expected_by_step(
        (4, TRAIN_TAGS), (4, EVAL_TAGS), (8, LATER_TAGS))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mlflow_store_from_config_then_environment_and_the_end_status(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    env_uri, cfg_uri = f"sqlite:///{tmp_path / 'env.db'}", f"sqlite:///{tmp_path / 'cfg.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    with pytest.raises(RuntimeError):
        _fail_inside(tmp_path / "a", LogConfig(mlflow=True, mlflow_experiment="exp"))
    with pytest.raises(Stopped):
        _fail_inside(tmp_path / "b", LogConfig(mlflow=True, mlflow_uri=cfg_uri), Stopped("SIGTERM", 15))
    assert not (tmp_path / "a" / "mlflow.db").exists() and not (tmp_path / "b" / "mlflow.db").exists()
    env_client = MlflowClient(tracking_uri=env_uri)
    (a,) = env_client.search_runs([env_client.get_experiment_by_name("exp").experiment_id])
    assert a.info.run_name == "a" and a.info.status == "FAILED"
    assert mlflow_metrics(env_client, a.info.run_id) == expected_by_step((8, LATER_TAGS))
    cfg_client = MlflowClient(tracking_uri=cfg_uri)
    (b,) = cfg_client.search_runs([cfg_client.get_experiment_by_name("mixlab").experiment_id])
    assert b.info.run_name == "b" and b.info.status == "KILLED"


def _fail_inside(run: Path, log: LogConfig, exc: BaseException | None = None) -> None:
    run.mkdir(parents=True)
    with MetricsWriter(run / "metrics.jsonl", True, log) as metrics:
        metrics.write(LATER)
        raise exc or RuntimeError("boom")
