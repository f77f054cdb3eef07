"""Train any Hugging Face causal LM in place of mixlab's GPT.

``HFCausalLM`` wraps a ``transformers`` causal LM so that it has the same contract as
``mixlab.model.gpt.GPT``: ``forward(idx [b, T]) -> logits [b, T, V]`` and a switchable
``attention`` attribute. ``transformers`` is optional: it is imported only when an HF model is
built, and its absence is a ``ConfigError`` that says ``pip install 'mixlab[hf]'``.

Where the model comes from (nothing is ever downloaded: no hub access):

- ``HFCausalLM.from_config(source, ...)``: a randomly initialised model from a ``config.json``
  file, a directory holding one, or a dict with ``model_type`` and config kwargs. ``overrides``
  (``model.hf_options``) replace fields of a file's config.
- ``HFCausalLM.from_pretrained(path, ...)``: weights from a local directory
  (``local_files_only=True``).

Vocabulary policy (the data's tokenizer is mixlab's own BPE, or the model's own when the data
was prepared with ``--tokenizer MODEL_DIR``):

- Randomly initialised models take the data's vocabulary size. A ``vocab_size`` in a config
  *file* is replaced (such files are usually copied architectures whose vocabulary belonged to
  another tokenizer; random rows lose nothing). A ``vocab_size`` in ``overrides``/the dict
  that differs from the data's is refused: it states something that cannot hold. Special token
  ids (bos/eos/pad/...) that fall outside the new vocabulary are cleared to ``None``; mixlab
  computes the loss itself and never generates, so they are unused.
- Pretrained models need an embedding of at least the data's vocabulary size (the data is
  meant to be tokenized with the model's own tokenizer: ``mixlab prepare --tokenizer
  MODEL_DIR``), otherwise ``ConfigError``. A larger one is common (embeddings padded to a
  multiple of 64 or 128 for speed) and is accepted with a log line (logger
  ``mixlab.model.hf``): the extra rows are never sampled, since no data id reaches them, and
  their logits are left out (``forward`` returns the first ``vocab_size`` columns), so the
  loss is a distribution over the ids the data can hold. Embeddings are never resized: new
  rows would be random and a smaller model's rows belong to the ids of another tokenizer.

Attention paths: ``"sdpa"`` maps to ``attn_implementation="sdpa"`` and ``"math"`` to
``"eager"`` (explicit softmax attention, which supports ``torch.func.jvp``). Switching at run
time uses ``PreTrainedModel.set_attn_implementation`` and works for models built on the
attention interface (GPT-2, Llama, Qwen2, Mistral, ... in recent ``transformers``); a model or
version that cannot switch raises ``ConfigError``: build it with ``model.attention = "math"``.

Weights are held in float32 whatever the checkpoint's dtype: mixed precision comes from
autocast in the trainer, and optimiser updates need float32 master weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mixlab.config import suggest
from mixlab.errors import ConfigError
from mixlab.model.gpt import AttentionImpl, check_attention

HF_ATTENTION: dict[str, str] = {"sdpa": "sdpa", "math": "eager"}
"""mixlab attention path -> ``transformers`` ``attn_implementation``."""

_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

log = logging.getLogger(__name__)


def require_transformers() -> ModuleType:
    """Import ``transformers``, or raise ``ConfigError`` telling how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "model.kind = 'hf' needs Hugging Face transformers, which is not installed: "
            "pip install 'mixlab[hf]'"
        ) from exc
    return transformers


def _read_config_dict(source: str | Path) -> dict[str, Any]:
    """The JSON of a config file, or of ``config.json`` inside a directory."""
    path = Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"HF config '{source}' not found: give a config.json file or a directory holding one."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"HF config '{file}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"HF config '{file}' must hold a JSON object.")
    return data


def _make_config(transformers: ModuleType, kwargs: dict[str, Any], where: str) -> Any:
    """``AutoConfig.for_model(model_type, **rest)`` with errors a user can act on."""
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{where} has no 'model_type' (e.g. 'gpt2', 'llama').")
    known = list(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        raise ConfigError(
            f"{where}: unknown HF model_type '{model_type}'.{suggest(model_type, known)}"
        )
    try:
        # Special token ids (the class defaults included: GPT-2's are 50256) that index past
        # the vocabulary only make transformers warn; mixlab never generates, so clear them.
        defaults = transformers.CONFIG_MAPPING[model_type]()
        vocab_size = kwargs.get("vocab_size")
        for name in _SPECIAL_TOKEN_IDS:
            value = kwargs.get(name, getattr(defaults, name, None))
            if isinstance(value, int) and isinstance(vocab_size, int) and value >= vocab_size:
                kwargs[name] = None
        return transformers.AutoConfig.for_model(model_type, **kwargs)
    except Exception as exc:
        # Config classes validate with their own exception types (huggingface_hub's strict
        # dataclass errors are plain Exceptions); any of them means the user's fields are wrong.
        raise ConfigError(
            f"{where}: transformers rejected the config ({type(exc).__name__}): {exc}"
        ) from None


def _check_positions(config: Any, seq_len: int, where: str) -> None:
    """Refuse a context longer than the model's position range (absolute embeddings would
    index out of range; rotary models were not sized for it)."""
    n_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(n_pos, int) and seq_len > n_pos:
        raise ConfigError(
            f"{where} allows {n_pos} positions (max_position_embeddings / n_positions) but "
            f"training uses seq_len {seq_len}; raise it in model.hf_options or lower seq_len."
        )


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM with mixlab's model contract.

    ``forward(idx LongTensor [b, T]) -> logits [b, T, vocab_size]`` (float32 unless under
    autocast). The wrapped model is ``self.hf``. Build with ``from_config``/``from_pretrained``
    or wrap an existing ``PreTrainedModel`` directly. ``vocab_size`` (default: the embedding's
    rows) may be smaller than the embedding: then only the first ``vocab_size`` logits are
    returned (padded embedding rows no data id reaches).
    """

    def __init__(
        self, model: nn.Module, attention: AttentionImpl = "sdpa", vocab_size: int | None = None
    ) -> None:
        super().__init__()
        self.hf = model.to(torch.float32)
        rows = int(model.get_input_embeddings().weight.shape[0])
        if vocab_size is not None and not 1 <= vocab_size <= rows:
            raise ConfigError(f"vocab_size must be in [1, {rows}] (the embedding's rows).")
        self.embedding_rows = rows
        self.vocab_size: int = rows if vocab_size is None else vocab_size
        self.attention = attention

    @classmethod
    def view(cls, model: nn.Module) -> HFCausalLM:
        """mixlab's contract over a model someone else trains (the HF Trainer's), changing
        nothing about it: no dtype cast, no attention switch, all logits. Its attention path is
        read from the model's config (``"eager"`` is ``"math"``; anything else counts as
        ``"sdpa"``, and switching back after a ``"math"`` measurement selects ``"sdpa"``)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.hf = model
        out.embedding_rows = out.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        out._attention = "math" if impl == "eager" else "sdpa"
        return out

    @classmethod
    def from_config(
        cls,
        source: str | Path | Mapping[str, Any],
        vocab_size: int,
        seq_len: int,
        attention: AttentionImpl = "sdpa",
        overrides: Mapping[str, Any] | None = None,
    ) -> HFCausalLM:
        """A randomly initialised model (seeded by ``torch.manual_seed``).

        ``source``: a config.json path, a directory holding one, or a dict with ``model_type``
        and config kwargs. ``overrides`` replace fields of ``source``. ``vocab_size`` is the
        data tokenizer's; see the module docstring for how a config's own value is treated.
        """
        transformers = require_transformers()
        check_attention(attention)
        if isinstance(source, Mapping):
            where, kwargs = "model.hf_options", dict(source)
        else:
            where, kwargs = f"HF config '{source}'", _read_config_dict(source)
            # A copied architecture's vocabulary belonged to another tokenizer.
            kwargs.pop("vocab_size", None)
        overrides = dict(overrides or {})
        if "model_type" in overrides and not isinstance(source, Mapping):
            raise ConfigError(
                "model.hf_options.model_type cannot change the model_type of a config file."
            )
        kwargs.update(overrides)
        stated = kwargs.pop("vocab_size", None)
        if stated is not None and stated != vocab_size:
            raise ConfigError(
                f"model.hf_options.vocab_size = {stated} but the data's tokenizer has "
                f"{vocab_size} ids; remove vocab_size (mixlab sets it from the data)."
            )
        config = _make_config(transformers, {**kwargs, "vocab_size": vocab_size}, where)
        _check_positions(config, seq_len, where)
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=HF_ATTENTION[attention]
            )
        except ValueError as exc:
            # Typical causes: no causal-LM class for this model_type, or no SDPA support.
            hint = " Try model.attention = 'math'." if "sdpa" in str(exc).lower() else ""
            raise ConfigError(
                f"{where}: transformers cannot build a causal LM from it: {exc}{hint}"
            ) from None
        return cls(model, attention)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        vocab_size: int,
        seq_len: int,
        attention: AttentionImpl = "sdpa",
        overrides: Mapping[str, Any] | None = None,
    ) -> HFCausalLM:
        """Weights from a local directory (``save_pretrained`` layout); never the hub.

        ``overrides`` set config fields at load time (e.g. a dropout). The model's embedding
        must have at least ``vocab_size`` rows; rows past it are never sampled and their
        logits are left out (no resizing; see the module docstring).
        """
        transformers = require_transformers()
        check_attention(attention)
        overrides = dict(overrides or {})
        for key in ("model_type", "vocab_size"):
            if key in overrides:
                raise ConfigError(f"model.hf_options.{key} cannot change a pretrained model.")
        where = f"pretrained model '{path}'"
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{where} is not a local directory with a config.json.")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path),
                local_files_only=True,
                attn_implementation=HF_ATTENTION[attention],
                **overrides,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load {where}: {exc}") from None
        n_vocab = int(model.get_input_embeddings().weight.shape[0])
        if n_vocab < vocab_size:
            raise ConfigError(
                f"{where} has a vocabulary of {n_vocab} ids but the data's tokenizer has "
                f"{vocab_size}; mixlab does not resize embeddings (existing rows belong to "
                "another tokenizer). Tokenize the data with the model's tokenizer (mixlab "
                "prepare --tokenizer MODEL_DIR), or train from its config (model.hf_config)."
            )
        _check_positions(model.config, seq_len, where)
        if n_vocab > vocab_size:
            log.warning(
                "note: %s has %d embedding rows for the data's %d token ids; rows %d..%d are "
                "never sampled and their logits are left out of the loss.",
                where, n_vocab, vocab_size, vocab_size, n_vocab - 1,
            )  # fmt: skip
        # transformers returns pretrained models in eval mode; every other model mixlab builds
        # starts in training mode, as any fresh nn.Module does.
        return cls(model.train(), attention, vocab_size)

    @property
    def attention(self) -> AttentionImpl:
        """The attention path now in use: ``"sdpa"`` or ``"math"`` (HF ``"eager"``)."""
        return self._attention

    @attention.setter
    def attention(self, impl: AttentionImpl) -> None:
        check_attention(impl)
        wanted = HF_ATTENTION[impl]
        config = self.hf.config
        if getattr(config, "_attn_implementation", None) != wanted:
            switch = getattr(self.hf, "set_attn_implementation", None)
            if switch is not None:
                try:
                    switch(wanted)
                except (ValueError, ImportError) as exc:
                    raise ConfigError(
                        f"{type(self.hf).__name__} cannot use {wanted} attention: {exc}"
                    ) from None
            if getattr(config, "_attn_implementation", None) != wanted:
                raise ConfigError(
                    f"{type(self.hf).__name__} cannot switch to {wanted} attention at run time "
                    "(needs a recent transformers and a model on its attention interface); "
                    "build it with model.attention = 'math'."
                )
        self._attention: AttentionImpl = impl

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx LongTensor [b, T] -> logits [b, T, vocab_size]."""
        logits = self.hf(input_ids=idx, use_cache=False).logits
        if self.vocab_size < self.embedding_rows:
            # Columns of padded rows: no target ever names them, so they leave the softmax.
            logits = logits[..., : self.vocab_size]
        return logits
