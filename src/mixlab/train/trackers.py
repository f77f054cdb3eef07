"""RUN/metrics.jsonl and the experiment trackers that mirror its scalars.

metrics.jsonl is the run's record: one JSON object per line, appended, always written (on the
main rank). The trackers are optional copies of its numbers for the dashboards people already
use, each switched on in the ``[log]`` table and each an optional extra:

=============  ==================  =========================  ==============================
``[log]`` key  tracker             extra                      where it writes
=============  ==================  =========================  ==============================
tensorboard    TensorBoard         ``mixlab[tensorboard]``    RUN/tb
wandb          Weights & Biases    ``mixlab[wandb]``          $WANDB_DIR, else RUN/wandb
mlflow         MLflow              ``mixlab[mlflow]``         log.mlflow_uri, else RUN/mlflow.db
=============  ==================  =========================  ==============================

Backends are a registry (``@register``), as mixers are: a backend is a ``Tracker`` subclass
that names its ``[log]`` switch, its extra and the modules it imports. Every tracker receives
the same ``(tag, value)`` pairs, from ``scalars(record)``, at the record's ``step``. Tracker run
ids are kept in RUN/trackers.json so that a resumed mixlab run continues the same W&B and
MLflow runs. docs/trackers.md is the user's page.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

from mixlab.data.format import write_json_atomic
from mixlab.errors import ConfigError, Stopped
from mixlab.train.config import LogConfig

Status = Literal["finished", "failed", "killed"]
"""How a run ended, for the trackers that record it (MLflow's run status, W&B's exit code)."""

STATE_FILE = "trackers.json"
"""RUN/trackers.json: each tracker's run id, so a resumed mixlab run continues it."""

PER_DOMAIN = ("domain_loss", "weights", "loss", "ppl", "loss_weights")
"""Record keys whose value is a table domain -> number: tag ``{kind}/{key}/{domain}``."""

REPORTS = ("mixer", "weighting")
"""Record keys holding a method's own report (``Mixer.report()``, the weighter's report):
numbers tagged ``{kind}/{key}/{name}``, tables of numbers ``{kind}/{key}/{name}/{entry}``."""

MLFLOW_PARAM_CHARS = 500
"""Config values longer than this are cut in MLflow's params (older servers refuse longer
ones); RUN/config.toml has them whole."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The ``(tag, value)`` pairs of one metrics record, in the record's order.

    - a number under ``key`` (not ``step``, not a bool): ``{kind}/{key}``;
    - a per-domain table (``PER_DOMAIN``): ``{kind}/{key}/{domain}`` for each number in it;
    - a report (``REPORTS``): ``{kind}/{key}/{name}`` for each number, and
      ``{kind}/{key}/{name}/{entry}`` for each number of a table in it.

    ``None`` (a domain not seen since the last line, a target loss without a target), strings,
    bools, lists and matrices (a mixer's per-domain vectors, Aioli's A) are left to
    metrics.jsonl: a list's entries have no names to tag them with. NaN and inf pass as they
    are. A record with ``kind = "train"`` and ``loss = 2.5`` gives ``("train/loss", 2.5)``.
    """
    kind = record["kind"]
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        if _number(value) and key != "step":
            out.append((f"{kind}/{key}", float(value)))
        elif isinstance(value, Mapping) and key in PER_DOMAIN:
            out += [(f"{kind}/{key}/{d}", float(v)) for d, v in value.items() if _number(v)]
        elif isinstance(value, Mapping) and key in REPORTS:
            for name, v in value.items():
                if _number(v):
                    out.append((f"{kind}/{key}/{name}", float(v)))
                elif isinstance(v, Mapping):
                    out += [(f"{kind}/{key}/{name}/{e}", float(x)) for e, x in v.items() if _number(x)]
    return out


# ------------------------------------------------------------------------------------ backends


@dataclass(frozen=True)
class TrackerRun:
    """What a backend is told about the mixlab run it mirrors."""

    dir: Path
    """The run dir (RUN)."""
    name: str
    """The tracker run's display name: the run dir's name."""
    log: LogConfig
    """The ``[log]`` table: each backend reads its own keys."""
    config: Mapping[str, Any] | None
    """The resolved config (as in RUN/config.toml), logged as the run's hyperparameters; None
    logs none."""
    resumed: bool
    """True when the mixlab run continues from a checkpoint: continue the saved tracker run."""
    saved: dict[str, Any] = field(default_factory=dict)
    """What this backend's ``state()`` returned when the run was last started ({} if never)."""


class Tracker(abc.ABC):
    """One tracker backend, opened for one run by its constructor ``Tracker(run: TrackerRun)``."""

    key: ClassVar[str]
    """The ``[log]`` switch that turns it on (a bool field of LogConfig)."""
    label: ClassVar[str]
    """Its name in messages."""
    extra: ClassVar[str]
    """The pip extra that installs it: ``pip install 'mixlab[EXTRA]'``."""
    modules: ClassVar[tuple[str, ...]]
    """Modules it imports; a missing one is a ConfigError naming the extra."""

    @abc.abstractmethod
    def log(self, pairs: list[tuple[str, float]], step: int) -> None:
        """Record the ``scalars()`` of one metrics record at optimizer step ``step``."""

    @abc.abstractmethod
    def close(self, status: Status) -> None:
        """Flush and end the tracker run."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker run (JSON-able); {} = nothing."""
        return {}


TRACKERS: dict[str, type[Tracker]] = {}
"""Registered backends by ``[log]`` key, in the order trackers are opened and fed."""


def register(key: str, *, label: str, extra: str, modules: tuple[str, ...]) -> Callable[[type[Tracker]], type[Tracker]]:
    """Class decorator: make a tracker backend available under ``log.KEY``."""

    def deco(cls: type[Tracker]) -> type[Tracker]:
        if key in TRACKERS:
            raise ValueError(f"tracker '{key}' registered twice")
        cls.key, cls.label, cls.extra, cls.modules = key, label, extra, modules
        TRACKERS[key] = cls
        return cls

    return deco


def enabled_trackers(log_cfg: LogConfig) -> list[type[Tracker]]:
    """The backends whose ``[log]`` switch is on."""
    return [cls for key, cls in TRACKERS.items() if getattr(log_cfg, key, False)]


def _require(module: str, needed_by: str, extra: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{needed_by} needs {module.split('.')[0]}: pip install 'mixlab[{extra}]'.") from None


def require_trackers(log_cfg: LogConfig) -> None:
    """Refuse, with the pip command, a ``[log]`` switch whose package is not installed.

    Imports the packages (a second or so for wandb and mlflow); MetricsWriter calls it on every
    rank, so that all ranks stop alike.
    """
    for cls in enabled_trackers(log_cfg):
        for module in cls.modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"log.{cls.key} = true needs {cls.label}: pip install 'mixlab[{cls.extra}]'."
                ) from None


@register("tensorboard", label="TensorBoard", extra="tensorboard", modules=("torch.utils.tensorboard",))
class TensorBoardTracker(Tracker):
    """Event files under RUN/tb; a resumed run adds a new event file to the same folder."""

    def __init__(self, run: TrackerRun):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.dir / "tb"))

    def log(self, pairs: list[tuple[str, float]], step: int) -> None:
        for tag, value in pairs:
            self.writer.add_scalar(tag, value, step)

    def close(self, status: Status) -> None:
        self.writer.close()


@register("wandb", label="wandb", extra="wandb", modules=("wandb",))
class WandbTracker(Tracker):
    """One W&B run per mixlab run; the mixlab step is W&B's step.

    The mode is ``log.wandb_mode``, else W&B's own choice ($WANDB_MODE, else online). A resumed
    mixlab run continues the saved W&B run id (``resume="allow"``); online, W&B refuses steps
    below the ones it has, so the steps a resumed run logs again (after its checkpoint, before
    the kill) are skipped here rather than warned about. Offline, a resumed run is a second
    offline folder with the same id, which ``wandb sync`` uploads into the one run.
    """

    def __init__(self, run: TrackerRun):
        import wandb

        cfg = run.log
        kwargs: dict[str, Any] = {
            "project": cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "mixlab",
            "entity": cfg.wandb_entity or None,  # None: $WANDB_ENTITY, else the default entity
            "name": run.name,
            "mode": cfg.wandb_mode,  # None: $WANDB_MODE, else online
            # W&B writes ./wandb by default; the run dir keeps a run's files together.
            "dir": None if os.environ.get("WANDB_DIR") else str(run.dir),
        }
        if run.resumed and run.saved.get("id"):
            # The config is already on the run; sending it again would clash where a
            # resume-free key (train.progress, ...) changed.
            kwargs.update(id=run.saved["id"], resume="allow")
        elif run.config is not None:
            kwargs["config"] = _plain(run.config)
        try:
            self.run = wandb.init(**kwargs)
        except wandb.errors.Error as exc:
            raise ConfigError(
                f"log.wandb: W&B could not start a run: {exc} Log in with `wandb login`, or set "
                "log.wandb_mode = 'offline' (upload later with `wandb sync`)."
            ) from None
        # Online, a resumed run's step is one past the last step W&B holds; 0 otherwise.
        self.first_step = int(getattr(self.run, "step", 0) or 0) if run.resumed else 0

    def log(self, pairs: list[tuple[str, float]], step: int) -> None:
        if step >= self.first_step and pairs:
            self.run.log(dict(pairs), step=step)

    def close(self, status: Status) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project}


@register("mlflow", label="MLflow", extra="mlflow", modules=("mlflow",))
class MlflowTracker(Tracker):
    """One MLflow run per mixlab run, through ``MlflowClient`` (no global active run, so a
    user's own ``mlflow.start_run()`` is left alone).

    The store is ``log.mlflow_uri``, else $MLFLOW_TRACKING_URI, else a SQLite file RUN/mlflow.db
    (MLflow 3 keeps the ``file:`` store in maintenance mode and refuses it by default). The
    resolved config is logged as params at the first start; a resumed run continues the saved
    run id (when the store is the same) and logs the steps after its checkpoint again, as the
    same values at the same steps.
    """

    STATUS: ClassVar[dict[str, str]] = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, run: TrackerRun):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        cfg = run.log
        default_store = not (cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        uri = (cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{(run.dir / 'mlflow.db').resolve()}")
        if uri.startswith("sqlite:"):
            # mlflow-skinny leaves out the database layer a SQLite store needs.
            for module in ("sqlalchemy", "alembic"):
                _require(module, f"log.mlflow with the store '{uri}'", "mlflow")
        name = cfg.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mixlab"
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        try:
            experiment_id = self._experiment(name, run.dir / "mlartifacts" if default_store else None)
            self.run_id = self._continued(run) or ""
            if not self.run_id:
                self.run_id = self.client.create_run(
                    experiment_id, run_name=run.name, tags={"mlflow.source.name": "mixlab train"}
                ).info.run_id
                if run.config is not None:
                    params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in _flatten(run.config).items()]
                    self.client.log_batch(self.run_id, params=params)
        except MlflowException as exc:
            raise ConfigError(f"log.mlflow: the MLflow store '{uri}' refused: {exc.message}") from None

    def _experiment(self, name: str, artifacts: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(
                name, artifact_location=artifacts.resolve().as_uri() if artifacts else None))
        except MlflowException:
            # Another run sharing the store created it between our two calls.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _continued(self, run: TrackerRun) -> str | None:
        """The saved run id, reopened, when this resumed run's store is the one it was in."""
        from mlflow.exceptions import MlflowException

        run_id = run.saved.get("run_id")
        if not (run.resumed and run_id and run.saved.get("uri") == self.uri):
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None  # deleted from the store since: start a new one
        self.client.update_run(run_id, status="RUNNING")
        return str(run_id)

    def log(self, pairs: list[tuple[str, float]], step: int) -> None:
        from mlflow.entities import Metric

        if pairs:
            ms = int(time.time() * 1000)
            # log_batch splits into the store's batch limits itself.
            self.client.log_batch(self.run_id, metrics=[Metric(t, v, ms, step) for t, v in pairs])

    def close(self, status: Status) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri}


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as plain dicts (W&B's config wants JSON-able values)."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------- the writer


class MetricsWriter:
    """Appends records to RUN/metrics.jsonl and mirrors their scalars to the enabled trackers.

    ``path`` is RUN/metrics.jsonl; only the writer with ``enabled`` (the main rank) writes or
    opens trackers, but every rank checks that the trackers' packages are installed, so a
    missing one stops all ranks alike. ``config`` (the resolved config) is logged as the tracker
    runs' hyperparameters; ``resumed`` continues the tracker runs saved in RUN/trackers.json.
    Use it as a context manager to record how the run ended (a ``Stopped`` run is 'killed',
    any other exception 'failed'); ``close()`` alone records 'finished'.
    """

    def __init__(self, path: str | Path, enabled: bool, log_cfg: LogConfig | None = None, *,
                 config: Mapping[str, Any] | None = None, resumed: bool = False):
        self.path, self.enabled = Path(path), enabled
        log_cfg = log_cfg if log_cfg is not None else LogConfig()
        require_trackers(log_cfg)
        self.trackers: list[Tracker] = []
        self._closed = False
        backends = enabled_trackers(log_cfg)
        if not (enabled and backends):
            return
        run_dir = self.path.parent
        state_path = run_dir / STATE_FILE
        saved: dict[str, Any] = _read_state(state_path) if resumed else {}
        try:
            for cls in backends:
                run = TrackerRun(run_dir, run_dir.name, log_cfg, config, resumed, saved.get(cls.key, {}))
                self.trackers.append(cls(run))
        except BaseException:
            self.close("failed")
            raise
        write_json_atomic(state_path, {**saved, **{t.key: t.state() for t in self.trackers}})

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` as one line (``json.dumps(record)``), then feed its scalars to the
        trackers at ``record["step"]``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.trackers:
            pairs, step = scalars(record), int(record["step"])
            for tracker in self.trackers:
                tracker.log(pairs, step)

    def close(self, status: Status = "finished") -> None:
        """End every tracker run (once; later calls do nothing). The first error is raised
        after every tracker has been closed."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as exc:  # close the others before raising
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        interrupted = isinstance(exc, (Stopped, KeyboardInterrupt))
        self.close("finished" if exc is None else "killed" if interrupted else "failed")


def _read_state(path: Path) -> dict[str, Any]:
    """RUN/trackers.json, or {} when there is none (a run from before trackers, or unreadable:
    the trackers then start new runs rather than stop the training)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

