"""Models: mixlab's small GPT, the adapter for any Hugging Face causal LM, and the loss.

Every model built here has one contract (see docs/architecture.md, "Model"):
``forward(idx LongTensor [b, T]) -> logits [b, T, V]`` and a run-time switchable attention
path (``attention_impl(model, "math")`` for forward-mode AD). ``per_sample_loss`` is the one
place the training loss is defined, so that training, evaluation and the alignment engine agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.errors import ConfigError
from mixlab.model.gpt import ATTENTION_IMPLS, GPT, AttentionImpl, attention_impl

__all__ = [
    "GPT",
    "AttentionImpl",
    "ModelConfig",
    "attention_impl",
    "build_model",
    "count_parameters",
    "per_sample_loss",
    "sequence_losses",
]


@dataclass
class ModelConfig:
    """Which model to train. ``n_layer``/``n_head``/``d_model``/``dropout`` apply to the GPT;
    an HF model takes its architecture from ``hf_config``/``hf_options``/``hf_pretrained``."""

    kind: Literal["gpt", "hf"] = "gpt"
    """'gpt': mixlab's small GPT. 'hf': any Hugging Face causal LM (pip install 'mixlab[hf]')."""
    n_layer: int = 2
    """GPT: number of transformer blocks."""
    n_head: int = 2
    """GPT: attention heads per block; must divide d_model."""
    d_model: int = 64
    """GPT: width of the residual stream (embedding size)."""
    dropout: float = 0.0
    """GPT: dropout on embeddings, attention weights and residual branches, in [0, 1)."""
    attention: Literal["sdpa", "math"] = "sdpa"
    """Attention path at the start: 'sdpa' (fused kernel, fast) or 'math' (explicit softmax
    attention; supports forward-mode AD). Code that needs forward AD switches to 'math' itself,
    so 'sdpa' is right unless the fused kernel misbehaves. For HF models 'math' is 'eager'."""
    hf_config: str = ""
    """HF: path of a config.json (or a directory holding one) to initialise randomly from.
    Its vocab_size is replaced by the data tokenizer's."""
    hf_options: dict[str, Any] = field(default_factory=dict)
    """HF: config kwargs. Alone, they are the whole config and must include model_type
    (e.g. {model_type = "llama", hidden_size = 64, ...}); with hf_config or hf_pretrained they
    override its fields. A vocab_size here must equal the data tokenizer's. The model's own
    dropout fields apply (GPT-2 defaults to 0.1, e.g. resid_pdrop), not model.dropout."""
    hf_pretrained: str = ""
    """HF: a local directory with pretrained weights (save_pretrained layout; no hub access).
    Its vocabulary must equal the data tokenizer's (embeddings are never resized)."""

    def __post_init__(self) -> None:
        if self.kind not in ("gpt", "hf"):
            raise ConfigError(f"model.kind {self.kind!r} is not one of 'gpt', 'hf'.")
        if self.attention not in ATTENTION_IMPLS:
            choices = ", ".join(repr(a) for a in ATTENTION_IMPLS)
            raise ConfigError(f"model.attention {self.attention!r} is not one of {choices}.")
        for name in ("n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}.")
        if self.d_model % self.n_head != 0:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")
        if not isinstance(self.hf_options, Mapping):
            raise ConfigError("model.hf_options must be a table of HF config fields.")
        if self.kind == "gpt":
            used = [n for n in ("hf_config", "hf_options", "hf_pretrained") if getattr(self, n)]
            if used:
                raise ConfigError(
                    f"model.{used[0]} is only used with model.kind = 'hf' (kind is 'gpt')."
                )
            return
        if self.hf_config and self.hf_pretrained:
            raise ConfigError("set model.hf_config or model.hf_pretrained, not both.")
        has_file = bool(self.hf_config or self.hf_pretrained)
        if has_file and "model_type" in self.hf_options:
            raise ConfigError(
                "model.hf_options.model_type is only used without hf_config/hf_pretrained "
                "(the file names the model type)."
            )
        if not has_file and "model_type" not in self.hf_options:
            raise ConfigError(
                "model.kind = 'hf' needs model.hf_config, model.hf_pretrained, or "
                "model.hf_options with a model_type (e.g. 'gpt2', 'llama')."
            )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """The model ``cfg`` describes, randomly initialised from the global torch RNG (or loaded,
    for ``hf_pretrained``), in float32 on the CPU, with ``cfg.attention`` selected.

    ``vocab_size`` is the data tokenizer's; ``seq_len`` the longest context it will see.
    The result maps ``idx [b, T] -> logits [b, T, vocab_size]`` for any ``T <= seq_len``.
    """
    if vocab_size < 1 or seq_len < 1:
        raise ConfigError(f"vocab_size and seq_len must be positive, got {vocab_size}, {seq_len}.")
    if cfg.kind == "gpt":
        return GPT(
            vocab_size,
            seq_len,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.d_model,
            dropout=cfg.dropout,
            attention=cfg.attention,
        )
    from mixlab.model.hf import HFCausalLM

    if cfg.hf_pretrained:
        return HFCausalLM.from_pretrained(
            cfg.hf_pretrained, vocab_size, seq_len, cfg.attention, overrides=cfg.hf_options
        )
    source: str | dict[str, Any] = cfg.hf_config or dict(cfg.hf_options)
    overrides = cfg.hf_options if cfg.hf_config else None
    return HFCausalLM.from_config(source, vocab_size, seq_len, cfg.attention, overrides=overrides)


def per_sample_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample, in nats/token, as float32 [b].

    ``tokens`` LongTensor [b, T+1]: inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
    The loss is computed in float32 even under autocast (bf16 log-softmax over a large
    vocabulary loses the small differences mixers compare). ``params``, when given, replaces
    the model's parameters for this call (``torch.func.functional_call``; tied weights follow),
    which is how ``torch.func.jvp``/``grad`` differentiate it, e.g. with the math attention::

        with attention_impl(model, "math"):
            loss, dloss = torch.func.jvp(lambda p: per_sample_loss(model, tokens, p), (params,), (v,))
    """
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be [b, T+1] with T >= 1, got shape {tuple(tokens.shape)}.")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if params is None:
        logits = model(inputs)
    else:
        logits = torch.func.functional_call(model, dict(params), (inputs,))
    return sequence_losses(logits, targets)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every token, float32 [b, T] in nats.

    ``logits`` [b, T, V] (any float dtype) for inputs ``tokens[:, :-1]``; ``targets`` LongTensor
    [b, T] = ``tokens[:, 1:]``. Computed in float32 with autocast off (bf16 log-softmax over a
    large vocabulary loses the small differences mixers compare).
    """
    b, t, v = logits.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets must be [{b}, {t}], got {tuple(targets.shape)}.")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        losses = F.cross_entropy(
            logits.float().reshape(b * t, v), targets.reshape(b * t), reduction="none"
        )
    return losses.view(b, t)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample, float32 [b] in nats/token: the mean over
    dim 1 of ``token_losses`` (so a caller that keeps the token losses gets the same bits)."""
    return token_losses(logits, targets).mean(dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a tied embedding/output matrix counts once;
    position embeddings count)."""
    return sum(p.numel() for p in model.parameters())
