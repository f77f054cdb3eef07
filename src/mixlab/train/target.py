"""The target set: a few documents a run specialises to, split into a probe and an eval part.

Mixers may compute losses and gradients on the *probe* part only; the loss reported in
metrics and summaries is on the *eval* part, which no method ever sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixlab.data.format import DataDir
from mixlab.data.tokenizer import encode_documents
from mixlab.errors import ConfigError
from mixlab.train.config import TargetConfig


@dataclass
class TargetSet:
    probe: torch.Tensor
    """LongTensor [n_probe_windows, seq_len + 1] that mixers may use."""
    eval: torch.Tensor
    """LongTensor [n_eval_windows, seq_len + 1] used only for reporting."""
    n_docs: int


def _read_texts(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    texts: list[str] = []
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace")
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{f}:{i} is not a JSON object with a 'text' field.") from None
        else:
            texts.append(raw)
    return [t for t in texts if t.strip()]


def _windows(docs: list[np.ndarray], length: int, what: str) -> torch.Tensor:
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = len(stream) // length
    if n == 0:
        raise ConfigError(
            f"the target's {what} part has {len(stream)} tokens, fewer than one sample "
            f"(data.seq_len + 1 = {length}); add target documents or lower data.seq_len."
        )
    return torch.from_numpy(stream[: n * length].reshape(n, length).astype(np.int64))


def load_target(cfg: TargetConfig, data: DataDir, seq_len: int, seed: int) -> TargetSet | None:
    """Tokenise and split the configured target set, or None when no target is configured."""
    if not cfg.enabled:
        return None
    if cfg.path:
        path = Path(cfg.path)
        if not path.exists():
            raise ConfigError(f"target.path '{path}' does not exist.")
        texts = _read_texts(path)
        if not texts:
            raise ConfigError(f"target.path '{path}' holds no non-empty document.")
        docs = encode_documents(data.tokenizer(), texts, data.eos_id)
    else:
        split = data.split(cfg.domain, "val")
        order = np.random.default_rng([seed, 7]).permutation(split.n_docs)
        take = order[: cfg.docs] if cfg.docs else order
        docs = [split.document(int(j)) for j in take]
    if len(docs) < 2:
        raise ConfigError("the target set needs at least 2 documents (a probe part and an eval part).")
    order = np.random.default_rng([seed, 11]).permutation(len(docs))
    n_probe = min(len(docs) - 1, max(1, round(cfg.probe_fraction * len(docs))))
    probe = [docs[i] for i in order[:n_probe]]
    held = [docs[i] for i in order[n_probe:]]
    length = seq_len + 1
    return TargetSet(_windows(probe, length, "probe"), _windows(held, length, "eval"), len(docs))
