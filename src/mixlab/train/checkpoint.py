"""Checkpoints: written atomically, the last N kept, loaded without unpickling code.

A checkpoint is a folder ``RUN/checkpoints/step-0000100/`` holding

- ``model.safetensors``: the model weights,
- ``state.pt``: optimizer, sampler, mixer, RNG and loop counters (plain containers and tensors
  only, loaded with ``torch.load(weights_only=True)``),
- ``meta.json``: step, mixlab version, checkpoint format version and the resolved config, used
  to refuse a checkpoint from another config or data dir with a message naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixlab import __version__
from mixlab.data.format import write_json_atomic
from mixlab.errors import CheckpointError

CKPT_VERSION = 1

# Config keys that may change between a run and its resumption without changing the result.
RESUME_FREE_KEYS = (
    "train.progress",
    "train.threads",
    "train.device",
    "train.parallel",  # DDP and FSDP checkpoints are the same full, unsharded tensors
    "checkpoint.keep",
    "checkpoint.every",
    "log.tensorboard",
    "log.wandb",
    "log.wandb_project",
    "log.wandb_entity",
    "log.wandb_mode",
    "log.mlflow",
    "log.mlflow_uri",
    "log.mlflow_experiment",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two resolved configs, ignoring resume-free keys."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE_KEYS:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
    return diffs


def _state_tensors(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings): store each tensor once by name.
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    items = model.state_dict().items() if isinstance(model, torch.nn.Module) else model.items()
    for name, t in items:
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_model(model: torch.nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """Save model weights (a module, or its full state dict) as safetensors, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(_state_tensors(model), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model`` (tied weights are restored by the module)."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(f"cannot read model weights {path}: {exc}") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # Tied parameters appear in state_dict under two names but are saved once.
    current = model.state_dict(keep_vars=True)
    loaded_ptrs = {current[k].data_ptr() for k in tensors if k in current}
    truly_missing = [k for k in missing if current[k].data_ptr() not in loaded_ptrs]
    if truly_missing or unexpected:
        raise CheckpointError(
            f"model weights {path} do not fit this model (missing {truly_missing[:5]}, "
            f"unexpected {unexpected[:5]}); was it written with another model config?"
        )


def to_plain(obj: Any) -> Any:
    """Numpy scalars and arrays as Python numbers and lists, so ``weights_only`` loading works."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    state: dict[str, Any],
    config: dict,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically (temp folder, then rename) and prune old ones.

    ``model`` is the module or its full state dict (FSDP gathers one on rank 0)."""
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=".tmp-"))
    try:
        save_file(_state_tensors(model), str(tmp / "model.safetensors"))
        torch.save(to_plain(state), tmp / "state.pt")
        meta = {"step": step, "mixlab_version": __version__, "ckpt_version": CKPT_VERSION, "config": config}
        write_json_atomic(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its meta.json exists)."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [p for p in Path(ckpt_root).glob("step-*") if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _as_read_now(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's resolved config as this mixlab reads a config, so a section whose layout
    changed since it was written (``[weighting]`` options) compares in its current layout and an
    interrupted run still resumes after an upgrade; unchanged when it no longer validates (the
    differences then say what changed)."""
    from mixlab.config import from_dict, to_dict
    from mixlab.errors import MixlabError
    from mixlab.train.config import TrainConfig

    try:
        return to_dict(from_dict(TrainConfig, saved))
    except (MixlabError, TypeError, ValueError):
        return saved


def load_checkpoint(path: Path, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint's meta and state after checking it belongs to ``config``.

    Returns ``(meta, state)``; the model weights are loaded separately with ``load_model``.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc}).") from None
    if meta.get("ckpt_version") != CKPT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('ckpt_version')} (mixlab "
            f"{meta.get('mixlab_version')}); this mixlab {__version__} reads version {CKPT_VERSION}."
        )
    diffs = config_differences(_as_read_now(meta.get("config", {})), config)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run:\n  " + "\n  ".join(diffs)
            + "\nResume with the same config, or start a new run with another --out."
        )
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint state {path / 'state.pt'} is unreadable: {exc}") from None
    return meta, state


def load_run_model(run_dir: str | Path, data: Any = None) -> torch.nn.Module:
    """The final model of a finished run (its ``model.safetensors`` and ``config.toml``);
    ``data`` (a ``DataDir``), when given, must share the run's tokenizer."""
    from mixlab.data.format import DataDir
    from mixlab.model import build_model
    from mixlab.train.config import load_config

    run = Path(run_dir)
    weights = run / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"'{run}' has no model.safetensors; is it a finished mixlab run?")
    cfg = load_config(run / "config.toml")
    run_data = DataDir.open(cfg.data.dir)
    if data is not None and run_data.manifest.tokenizer_sha256 != data.manifest.tokenizer_sha256:
        raise CheckpointError(f"run '{run}' used a different tokenizer than this run's data dir.")
    model = build_model(cfg.model, run_data.vocab_size, cfg.data.seq_len)
    load_model(model, weights)
    return model
