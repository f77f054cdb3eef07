"""The Data Weighting Model: a small network that scores each sample of a batch.

Weights within a normalisation group of b samples are ``w = b · softmax(s / τ)`` (mean 1), so
the weighted loss ``Σ w_i ℓ_i / b`` keeps the scale of the plain mean. The head starts at zero,
so every score is 0 and every weight 1 until the model has been trained.

Architecture (sized by config, independent of the language model's size): token embedding
[V, d] → one width-k 1-D convolution with GELU (local order: it can tell a shuffled window
from a real one, which a bag of tokens cannot) → mean- and max-pooling over positions [2d] →
optional features (a domain embedding, the LM's current loss on the sample standardised
within its normalisation group — the weights are relative within it too, and a raw loss
varies too little between samples for a freshly initialised MLP to notice —, the training
progress in [0, 1]) → MLP (hidden units, GELU) → one score. It depends on the
tokenizer through its embedding table, which is why the tokenizer's hash travels with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mixlab.errors import ConfigError


@dataclass(frozen=True)
class NetSpec:
    """The shape of a weighting network (saved with it; enough to rebuild it)."""

    vocab_size: int
    n_domains: int
    d_embed: int = 32
    kernel: int = 3
    hidden: int = 64
    max_tokens: int = 0
    """Read at most this many leading tokens of each sample (0 = all)."""
    use_domain: bool = False
    use_loss: bool = False
    use_progress: bool = False

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.n_domains, self.d_embed, self.kernel, self.hidden) < 1:
            raise ConfigError(f"weighting network sizes must be >= 1, got {asdict(self)}.")
        if self.max_tokens < 0:
            raise ConfigError(f"weighting max_tokens must be >= 0, got {self.max_tokens}.")


class WeightingNet(nn.Module):
    """Scores [b] for samples ``tokens`` [b, T] (and optional per-sample features)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_embed
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.conv = nn.Conv1d(d, d, spec.kernel)
        self.domain_embed = nn.Embedding(spec.n_domains, 8) if spec.use_domain else None
        n_in = 2 * d + (8 if spec.use_domain else 0) + int(spec.use_loss) + int(spec.use_progress)
        self.hidden = nn.Linear(n_in, spec.hidden)
        # No bias: a score shift common to the batch cancels in the softmax, so a bias only
        # gets rounding noise as gradient, which Adam would blow up into a random walk.
        self.head = nn.Linear(spec.hidden, 1, bias=False)
        # The loss also reaches the score directly: one coefficient learns "prefer low (or
        # high) loss" in a few updates, where through the MLP it competes with 64 text features.
        self.loss_coef = nn.Parameter(torch.zeros(1)) if spec.use_loss else None
        nn.init.normal_(self.embed.weight, std=0.5)
        # Zero head: every score is 0 at the start, so training starts from uniform weights.
        nn.init.zeros_(self.head.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        domains: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        progress: float = 0.0,
    ) -> torch.Tensor:
        """tokens [b, T] int64, domains [b] int64, losses [b] (the LM's, detached, already
        standardised: see ``standardise``) -> [b] float32 scores."""
        s = self.spec
        if s.max_tokens:
            tokens = tokens[:, : s.max_tokens]
        if tokens.shape[1] < s.kernel:
            raise ValueError(f"samples of {tokens.shape[1]} tokens are shorter than the kernel {s.kernel}.")
        x = self.embed(tokens).transpose(1, 2)  # [b, d, T]
        h = F.gelu(self.conv(x))  # [b, d, T - k + 1]
        feats = [h.mean(dim=2), h.amax(dim=2)]
        b = tokens.shape[0]
        if s.use_domain:
            if domains is None:
                raise ValueError("this weighting network reads the domain; pass domains.")
            assert self.domain_embed is not None
            feats.append(self.domain_embed(domains))
        direct = torch.zeros(b, device=tokens.device)
        if s.use_loss:
            if losses is None:
                raise ValueError("this weighting network reads the LM's loss; pass losses.")
            assert self.loss_coef is not None
            z = losses.detach().float().reshape(b, 1)
            feats.append(z)
            direct = self.loss_coef * z.squeeze(1)
        if s.use_progress:
            feats.append(torch.full((b, 1), float(progress), device=tokens.device))
        hid = F.gelu(self.hidden(torch.cat(feats, dim=1)))
        return self.head(hid).squeeze(1) + direct


def standardise(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """[b] ``(x - mean) / std`` within consecutive groups of ``group`` (0 = all b); a group
    whose values are all equal gives zeros."""
    b = x.shape[0]
    g = group or b
    z = x.detach().float().reshape(b // g, g)
    std = z.std(dim=1, unbiased=False, keepdim=True)
    return ((z - z.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))).reshape(b)


def batch_weights(scores: torch.Tensor, tau: float, group: int = 0, max_weight: float = 0.0) -> torch.Tensor:
    """[b] weights ``g · softmax(scores / tau)`` within consecutive groups of ``group`` samples
    (0 = one group of all b); each group has mean weight 1. Differentiable.

    ``max_weight`` > 1 bounds every weight: a group whose largest weight m exceeds it is mixed
    with uniform, ``w ← (1 - λ) w + λ`` with ``λ = (m - max_weight) / (m - 1)``, which keeps the
    mean at 1, the order of the weights, and makes the largest exactly ``max_weight``.
    """
    b = scores.shape[0]
    g = group or b
    if b % g:
        raise ValueError(f"batch of {b} samples does not split into groups of {g}.")
    z = (scores / tau).reshape(b // g, g)
    w = g * torch.softmax(z, dim=1)
    if max_weight > 0:
        if max_weight <= 1:
            raise ValueError(f"max_weight must be > 1 (the mean weight), got {max_weight}.")
        top = w.amax(dim=1, keepdim=True)
        lam = torch.clamp((top - max_weight) / torch.clamp(top - 1, min=1e-12), min=0.0)
        w = (1 - lam) * w + lam
    return w.reshape(b)
