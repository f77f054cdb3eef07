"""How much memory a training run needs, estimated before anything is allocated.

A ``data.seq_len`` or ``train.batch_size`` far beyond the machine used to be found by the kernel
(killed, exit 137, no message). ``check_memory`` refuses such a config with the estimate and
the memory available, before the model is built.

The estimate is a *lower bound* of the peak, from the tensors that certainly exist at once:

- parameters, their gradients and AdamW's two moments: 4 x 4 bytes per parameter, fp32;
- the GPT's causal masks: one ``seq_len x seq_len`` bool buffer per block, built with the model;
- per micro-batch (``b = batch_size / (world x grad_accum)`` samples of ``T = seq_len``
  tokens), the activations autograd saves for backward: per block, the residual input, the
  LayerNorm outputs, q/k/v, the attention output and its re-layout, the MLP's 4d hidden layer
  before and after GELU: ``ACT_PER_LAYER = 16`` x b x T x d values, 4 bytes each (2 under
  bf16 autocast); with ``model.attention = 'math'`` also the softmax of the scores,
  b x heads x T x T, and the two score-sized gradients of its backward;
- the logits, b x T x vocab: ``sequence_losses`` computes the cross-entropy in fp32 (also
  under bf16 autocast), and in backward the log-softmax output autograd kept, its gradient and
  the logits' gradient are alive at once: ``LOGIT_COPIES = 3`` fp32 copies;
- evaluation (no gradients), one chunk of ``min(eval.batch_size, most eval windows)`` samples:
  the logits and their log-softmax (2 fp32 copies; under bf16 autocast the bf16 logits too).

Left out, so the bound stays below the truth: the optimizer's temporaries, allocator slack,
the eval windows held in memory, DDP's gradient buckets, a reference model, branch copies.
Measured against the peak resident memory of training steps and an evaluation on CPU (the
table in ``estimate_memory``; ``tests/test_bad_input.py`` re-measures the demo config), the
estimate is 0.47-0.64 of the truth: configs that fit are never refused, and a config is refused
only when this lower bound alone exceeds what is available. bf16 (CUDA) is argued, not measured.

Hugging Face models (``model.kind = 'hf'``) are sized before they are built only through the
logits (their architecture lives in their own config), so for them the check is looser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mixlab.errors import ConfigError
from mixlab.train.config import TrainConfig

ACT_PER_LAYER = 16
"""Values of size d saved per token per GPT block for backward (see the module docstring)."""
LOGIT_COPIES = 3
"""fp32 copies of the [b, T, vocab] logits alive at the peak of a training step's backward."""
EVAL_LOGIT_COPIES = 2
"""fp32 copies of the logits alive in an evaluation forward (logits and their log-softmax)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run needs at its peak, by component (a lower bound; see module)."""

    parameters: int
    """Weights, gradients and the two AdamW moments."""
    masks: int
    """The causal-mask buffers of the GPT blocks."""
    activations: int
    """What autograd saves for backward in one micro-batch (attention scores included)."""
    logits: int
    """The logits-sized tensors of one training micro-batch."""
    eval: int
    """The logits-sized tensors of one evaluation chunk."""

    @property
    def total(self) -> int:
        # Evaluation runs between steps, when the step's activations are freed.
        return self.parameters + self.masks + max(self.activations + self.logits, self.eval)

    def describe(self) -> str:
        step = self.activations + self.logits
        return (
            f"parameters + AdamW state {_size(self.parameters)}, causal masks "
            f"{_size(self.masks)}, activations {_size(self.activations)} and logits "
            f"{_size(self.logits)} per micro-batch"
            + (f", evaluation logits {_size(self.eval)}" if self.eval > step else "")
        )


def gpt_parameters(vocab_size: int, seq_len: int, n_layer: int, d_model: int) -> int:
    """Parameters of mixlab's GPT: tied token embedding/output (V d), position embedding (T d),
    per block 12 d^2 + 13 d (qkv, attention projection, 4x MLP, two LayerNorms), final
    LayerNorm (2 d). ``count_parameters(build_model(...))`` gives the same number."""
    d = d_model
    return vocab_size * d + seq_len * d + n_layer * (12 * d * d + 13 * d) + 2 * d


def estimate_memory(
    cfg: TrainConfig, vocab_size: int, world_size: int = 1, bf16: bool = False
) -> MemoryEstimate:
    """Lower bound of the peak memory (bytes) of one process of a run of ``cfg``.

    ``world_size`` processes share each global batch (and, under ``train.parallel = 'fsdp'``,
    the parameters and their state); ``bf16`` = autocast, as on CUDA by default.

    Measured on CPU (torch 2.x, fp32, one thread; growth of peak RSS over two AdamW steps and
    one eval forward, from just before the model is built), estimate / measured:

    ========================================================  ==========  ========
    config                                                    measured    estimate
    ========================================================  ==========  ========
    tiny test (vocab 64, T 16, d 32, 1 layer, batch 4)        32.1 MB     0.45 MB
    demo (vocab 2048, T 128, d 64, 2 layers, batch 16, eval   219 MB      138 MB
    chunk 64)
    demo with vocab 8192                                      858 MB      547 MB
    vocab 8192, T 512, d 128, 4 layers, batch 16, chunk 64    3.87 GB     2.18 GB
    vocab 8192, T 2048, d 128, 4 layers, batch 4, math attn.  5.82 GB     2.75 GB
    ========================================================  ==========  ========

    The estimate stays below every measurement (ratios 0.47-0.64 where the tensors dominate;
    the tiny config's 32 MB is torch's own one-time allocations), so it refuses only configs
    that cannot fit, and it is within ~2x, so it catches a seq_len that is far beyond memory.
    """
    m, t, e = cfg.model, cfg.data.seq_len, cfg.eval
    b = max(1, cfg.train.batch_size // max(1, world_size * cfg.train.grad_accum))
    act = 2 if bf16 else 4
    if m.kind == "gpt":
        n_params = gpt_parameters(vocab_size, t, m.n_layer, m.d_model)
        masks = m.n_layer * t * t
        per_layer = ACT_PER_LAYER * b * t * m.d_model * act
        if m.attention == "math":
            per_layer += b * m.n_head * t * t * act
            scores_backward = 2 * b * m.n_head * t * t * act
        else:
            scores_backward = 0
        activations = m.n_layer * per_layer + scores_backward + 3 * b * t * m.d_model * act
    else:
        n_params, masks, activations = 0, 0, 0
    if cfg.train.parallel == "fsdp":
        n_params //= max(1, world_size)
    logits = b * t * vocab_size * LOGIT_COPIES * 4
    chunk = max(1, min(e.batch_size, max(e.windows, e.signal_windows, e.test_windows)))
    eval_bytes = chunk * t * vocab_size * (EVAL_LOGIT_COPIES * 4 + (2 if bf16 else 0))
    return MemoryEstimate(16 * n_params, masks, activations, logits, eval_bytes)


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process may still allocate on ``device``, where that number comes from):
    free memory of a CUDA device; on CPU the smaller of MemAvailable and the cgroup limit."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "available (MemAvailable)"))
    except OSError:
        pass
    cg = _cgroup_room()
    if cg is not None:
        found.append((cg, "left under this container's memory limit"))
    if not found:
        return 0, ""
    return min(found)


def _cgroup_room() -> int | None:
    """Bytes left under the cgroup memory limit (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, limit - usage)
    return None


def check_memory(
    cfg: TrainConfig, vocab_size: int, device: torch.device, world_size: int = 1,
    bf16: bool = False,
) -> MemoryEstimate:
    """Refuse (``ConfigError``) a run whose estimated peak memory exceeds what ``device`` has
    available; returns the estimate. On CPU, the processes of this host (``LOCAL_WORLD_SIZE``)
    share the memory, so their estimates add up."""
    est = estimate_memory(cfg, vocab_size, world_size, bf16)
    room, where = available_memory(device)
    if not room:
        return est  # nothing to compare with (not Linux): let the run try
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = est.total * max(1, local)
    if need > room:
        t = cfg.train
        per = f" x {local} processes" if local > 1 else ""
        raise ConfigError(
            f"data.seq_len = {cfg.data.seq_len}, train.batch_size = {t.batch_size} (micro-batch "
            f"{max(1, t.batch_size // max(1, world_size * t.grad_accum))}), model.n_layer = "
            f"{cfg.model.n_layer}, d_model = {cfg.model.d_model}, vocab {vocab_size} need at "
            f"least {_size(est.total)}{per} of memory ({est.describe()}) but {_size(room)} is "
            f"{where}; lower data.seq_len, train.batch_size or eval.batch_size, raise "
            "train.grad_accum, or use a smaller model."
        )
    return est


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
