"""A small GPT (nanoGPT-like) with two interchangeable attention paths.

Architecture: token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
self-attention, then a 4x GELU MLP, each added to the residual stream), a final LayerNorm and
an output layer tied to the token embedding. Initialisation follows GPT-2: every weight
N(0, 0.02), biases zero, and the two projections that write into the residual stream in each
block scaled by 1/sqrt(2 * n_layer) so the residual variance does not grow with depth.

Attention has two implementations, chosen at run time through ``GPT.attention`` (or the
``attention_impl`` context manager) without rebuilding the model or touching its weights:

- ``"sdpa"``: ``F.scaled_dot_product_attention(is_causal=True)``, the fast fused kernel.
  On CPU it dispatches to a flash kernel that has no forward-mode AD (``torch.func.jvp``
  raises ``NotImplementedError``).
- ``"math"``: explicit ``softmax(q k^T / sqrt(d) + causal mask) v`` from elementary ops, all
  of which support forward-mode AD. The alignment engine (per-sample directional derivatives
  with ``torch.func.jvp``) runs the model under this path.

Both paths compute the same function (equal to float rounding); the tests hold them to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mixlab.errors import ConfigError

AttentionImpl = Literal["sdpa", "math"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


def check_attention(impl: str) -> None:
    """Raise ``ConfigError`` unless ``impl`` names an attention path."""
    if impl not in ATTENTION_IMPLS:
        choices = ", ".join(repr(a) for a in ATTENTION_IMPLS)
        raise ConfigError(f"attention implementation {impl!r} is not one of {choices}.")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``impl`` selects the kernel (see module docstring)."""

    def __init__(self, d_model: int, n_head: int, seq_len: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head != 0:
            raise ConfigError(f"d_model ({d_model}) must be divisible by n_head ({n_head}).")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.impl: AttentionImpl = "sdpa"
        # Non-persistent: derived from seq_len, so it stays out of checkpoints and out of the
        # parameter/buffer dicts a caller has to provide to torch.func.functional_call.
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, T, d] -> [b, T, d]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # [b, T, d] -> [b, h, T, d/h]
        q = q.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~self.causal_mask[:t, :t], float("-inf"))
            att = F.dropout(att.softmax(dim=-1), p=p, training=self.training)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> GELU -> d."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, T, d] -> [b, T, d]."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, seq_len: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, seq_len, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, T, d] -> [b, T, d]."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model: ``forward(idx [b, T]) -> logits [b, T, V]``.

    ``seq_len`` is the longest context the position embedding covers; shorter inputs are fine.
    The output layer shares its weight with the token embedding (``head.weight is
    tok_emb.weight``), so ``parameters()`` yields that matrix once.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int = 2,
        n_head: int = 2,
        d_model: int = 64,
        dropout: float = 0.0,
        attention: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        if vocab_size < 1 or seq_len < 1 or n_layer < 1 or n_head < 1 or d_model < 1:
            raise ConfigError(
                "vocab_size, seq_len, n_layer, n_head and d_model must all be positive, got "
                f"{vocab_size}, {seq_len}, {n_layer}, {n_head}, {d_model}."
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, seq_len, dropout) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self._init_weights(n_layer)
        self.attention = attention

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # Each block adds two projections into the residual stream; scaling them keeps the
        # stream's variance independent of depth at init (GPT-2, section 2.3).
        resid_std = 0.02 / math.sqrt(2 * n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)

    @property
    def attention(self) -> AttentionImpl:
        """The attention path every block uses now: ``"sdpa"`` or ``"math"``."""
        return self._attention

    @attention.setter
    def attention(self, impl: AttentionImpl) -> None:
        check_attention(impl)
        self._attention: AttentionImpl = impl
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.impl = impl

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx LongTensor [b, T] (T <= seq_len) -> logits [b, T, vocab_size]."""
        t = idx.size(1)
        if t > self.seq_len:
            raise ValueError(f"input has {t} positions but the model was built for {self.seq_len}.")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _attention_owner(model: nn.Module) -> nn.Module:
    """The module that carries ``attention``, looking through DDP (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers."""
    target = model
    while not hasattr(target, "attention"):
        inner = getattr(target, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(target, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(
                f"{type(model).__name__} has no switchable attention; build it with "
                "mixlab.model.build_model."
            )
        target = inner
    return target


@contextmanager
def attention_impl(model: nn.Module, impl: AttentionImpl) -> Iterator[nn.Module]:
    """Run ``model`` with attention path ``impl`` inside the block; restore the previous path
    on exit (also when the block raises). Works for ``GPT`` and ``HFCausalLM``, wrapped or not.

    Example: ``with attention_impl(model, "math"): torch.func.jvp(...)``.
    """
    check_attention(impl)
    owner = _attention_owner(model)
    previous = owner.attention
    owner.attention = impl
    try:
        yield model
    finally:
        owner.attention = previous
