"""Small helpers shared by the dynamic mixers: reading per-domain weights given by the user."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixlab.errors import ConfigError


def weights_from_mapping(
    given: Mapping[str, float], domains: Sequence[str], what: str
) -> np.ndarray:
    """[m] distribution from ``{domain: weight}`` (any positive scale), in the order of ``domains``.

    Every domain must be listed, no other name may appear; weights must be finite, >= 0 and not
    all zero. ``what`` names the option in error messages (e.g. ``mixer.options.prior``).
    """
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise ConfigError(f"{what} names unknown domain(s) {unknown}; domains are {list(domains)}.")
    missing = [d for d in domains if d not in given]
    if missing:
        raise ConfigError(f"{what} is missing domain(s) {missing}; give a weight for every domain.")
    w = np.array([float(given[d]) for d in domains], dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"{what} must be finite and >= 0, got {dict(zip(domains, w.tolist()))}.")
    if w.sum() <= 0:
        raise ConfigError(f"{what} has no positive weight; at least one domain needs weight > 0.")
    return w / w.sum()


def run_final_weights(run_dir: str, domains: Sequence[str], what: str) -> np.ndarray:
    """[m] ``weights_final`` of a finished run (its ``summary.json``), in the order of ``domains``."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(
            f"{what} = '{run_dir}' has no summary.json; point it at a finished run directory."
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        final = summary["weights_final"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a mixlab summary with 'weights_final'.") from None
    if not isinstance(final, dict):
        raise ConfigError(f"{path}: 'weights_final' must map domain names to weights.")
    return weights_from_mapping(final, domains, f"{what} ({path})")
