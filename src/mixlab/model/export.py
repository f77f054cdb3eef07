"""A finished run as a Hugging Face model directory (``mixlab export RUN --hf DIR``).

The directory holds ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads with no custom code, the data
dir's tokenizer (``AutoTokenizer.from_pretrained(DIR)``) and a model card (``README.md``) with
the data dir, the mixture trajectory summary and the final metrics.

mixlab's GPT (``mixlab.model.gpt``) maps exactly onto transformers' GPT-2
(``GPT2LMHeadModel``), tensor for tensor:

==============================================  ================================================
mixlab ``GPT``                                  ``GPT2LMHeadModel``
==============================================  ================================================
``tok_emb`` [V, d]                              ``transformer.wte``
``pos_emb`` [T, d] (learned, absolute)          ``transformer.wpe``, ``n_positions = T``
``blocks.i.ln1`` / ``ln2`` (LayerNorm, bias)    ``transformer.h.i.ln_1`` / ``ln_2``
``blocks.i.attn.qkv`` Linear [3d, d] + bias     ``h.i.attn.c_attn`` Conv1D [d, 3d] (transposed)
``blocks.i.attn.proj`` Linear [d, d] + bias     ``h.i.attn.c_proj`` Conv1D (transposed)
``blocks.i.mlp.fc`` Linear [4d, d] + bias       ``h.i.mlp.c_fc`` Conv1D (transposed)
``blocks.i.mlp.proj`` Linear [d, 4d] + bias     ``h.i.mlp.c_proj`` Conv1D (transposed)
``ln_f``                                        ``transformer.ln_f``
``head`` (tied to ``tok_emb``, no bias)         ``lm_head`` (``tie_word_embeddings = True``)
==============================================  ================================================

Both are pre-LayerNorm (eps 1e-5) with residual adds, split the fused q/k/v projection in the
order q, k, v along the last axis and each of those into ``n_head`` contiguous heads, scale
scores by 1/sqrt(d / n_head) under a causal mask, and drop out in the same three places
(embeddings, attention probabilities, each residual branch). The one difference from GPT-2's
*defaults* is the MLP activation: mixlab uses the exact GELU (``F.gelu``, erf), GPT-2 the tanh
approximation (``"gelu_new"``); the exported config sets ``activation_function = "gelu"``
(transformers' exact GELU), so the exported model computes mixlab's function. A Llama mapping
would not be exact (RMSNorm, rotary positions, SwiGLU, no biases).

Runs with ``model.kind = "hf"`` already are a transformers model: they are written with
``save_pretrained``.

Before the directory is moved into place, the exported model is loaded back with transformers
and its logits are compared with mixlab's on a fixed batch (``check_logits``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixlab.errors import MixlabError
from mixlab.model.gpt import GPT

LOGIT_RTOL = 1e-4
"""Largest |exported - mixlab| / (largest |mixlab logit|) ``check_logits`` accepts, float32.

Both models run the same operations on the same float32 weights; they differ only in how
kernels order the sums (a fused ``addmm`` against a Conv1D's ``addmm`` on the transposed
weight, SDPA against eager softmax attention). Each dot product of length K then differs by a
few ulp x sqrt(K) relative to the size of its terms (eps = 6e-8); through a few layers of
LayerNorm and residual adds that stays ~1e-6 of the logits' scale (measured on the test
models: 0 with the same kernels, 4.7e-7 SDPA against eager). 1e-4 leaves room for deep, wide
models and other CPUs; it is a guard against gross errors (a layout change in a transformers
release: a transposed or swapped matrix, a dropped bias move logits by 1e-1 of their scale).
Subtle ones (the tanh GELU: 1.6e-4 at O(1) weights, ~5e-6 in a barely trained model) are
pinned by the tests at 1e-5, not here."""


@dataclass(frozen=True)
class Exported:
    """What ``export_run`` wrote."""

    path: Path
    architecture: str
    """e.g. ``GPT2LMHeadModel``."""
    max_rel_diff: float
    """``check_logits``'s measured difference to mixlab's logits."""


def gpt2_config(model: GPT, eos_id: int, dropout: float) -> dict[str, Any]:
    """``GPT2Config`` keyword arguments describing ``model`` exactly (see the module docstring).

    ``eos_id`` is the data's end-of-document id (GPT-2 uses one token for bos and eos);
    ``dropout`` the run's ``model.dropout``, kept for further training (inference ignores it).
    """
    first = model.blocks[0]
    d = model.tok_emb.weight.shape[1]
    return {
        "vocab_size": model.vocab_size,
        "n_positions": model.seq_len,
        "n_embd": d,
        "n_layer": len(model.blocks),
        "n_head": first.attn.n_head,
        "n_inner": first.mlp.fc.out_features,
        "activation_function": "gelu",  # exact (erf) GELU, as F.gelu; GPT-2's default is tanh
        "layer_norm_epsilon": first.ln1.eps,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` weights from mixlab ``GPT`` weights (copies, float32, on the CPU).

    transformers' ``Conv1D`` stores ``weight`` as [in, out] (``x @ W + b``) where ``nn.Linear``
    stores [out, in] (``x @ W.T + b``), hence the transposes.
    """

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", torch.float32).clone()

    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": t(model.tok_emb.weight),
        "transformer.wpe.weight": t(model.pos_emb.weight),
        "transformer.ln_f.weight": t(model.ln_f.weight),
        "transformer.ln_f.bias": t(model.ln_f.bias),
    }
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}"
        pairs = {
            "ln_1": (block.ln1, False),
            "ln_2": (block.ln2, False),
            "attn.c_attn": (block.attn.qkv, True),
            "attn.c_proj": (block.attn.proj, True),
            "mlp.c_fc": (block.mlp.fc, True),
            "mlp.c_proj": (block.mlp.proj, True),
        }
        for name, (module, conv1d) in pairs.items():
            w = t(module.weight)
            out[f"{h}.{name}.weight"] = w.T.contiguous() if conv1d else w
            out[f"{h}.{name}.bias"] = t(module.bias)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def to_hf(model: nn.Module, eos_id: int, dropout: float = 0.0) -> nn.Module:
    """The ``transformers`` model equal to ``model`` (a mixlab ``GPT`` -> ``GPT2LMHeadModel``;
    an ``HFCausalLM`` -> the model it wraps), in eval mode."""
    from mixlab.model.hf import HFCausalLM, require_transformers

    transformers = require_transformers()
    if isinstance(model, HFCausalLM):
        return model.hf.eval()
    if not isinstance(model, GPT):
        raise MixlabError(f"cannot export a {type(model).__name__}: not a mixlab GPT or HF model.")
    config = transformers.GPT2Config(**gpt2_config(model, eos_id, dropout))
    hf = transformers.GPT2LMHeadModel(config)
    try:
        hf.load_state_dict(gpt2_state_dict(model), strict=True)
    except RuntimeError as exc:  # a transformers whose GPT-2 names its tensors otherwise
        raise MixlabError(
            f"this transformers ({transformers.__version__}) lays out GPT-2 differently: {exc}"
        ) from None
    hf.tie_weights()
    return hf.eval()


def check_logits(mixlab_model: nn.Module, hf_dir: Path, seq_len: int, vocab: int) -> float:
    """Load ``hf_dir`` with ``AutoModelForCausalLM`` and return max |hf - mixlab| / max |mixlab|
    of the logits on a fixed batch [2, min(seq_len, 64)] of ids below ``vocab``;
    ``MixlabError`` when it exceeds ``LOGIT_RTOL``."""
    from mixlab.model.hf import require_transformers

    transformers = require_transformers()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
    loaded.float().eval()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (2, min(seq_len, 64)), generator=gen)
    was_training = mixlab_model.training
    mixlab_model.eval()
    try:
        with torch.no_grad():
            ref = mixlab_model(idx).float()
            got = loaded(input_ids=idx).logits.float()[..., : ref.shape[-1]]
    finally:
        mixlab_model.train(was_training)
    rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if not math.isfinite(rel) or rel > LOGIT_RTOL:
        raise MixlabError(
            f"the exported model's logits differ from mixlab's by {rel:.2e} of their scale "
            f"(more than {LOGIT_RTOL:g}); the export was not written. Please report this with "
            "your transformers version."
        )
    return rel


def export_tokenizer(data_root: Path, out: Path, eos_token: str, max_length: int | None) -> None:
    """Write the data dir's tokenizer into ``out`` with its ``tokenizer_config.json`` and
    ``special_tokens_map.json`` (made from the manifest's EOS for data dirs prepared before
    mixlab wrote them), ``model_max_length`` set to the model's context."""
    from mixlab.data import tokenizer as bpe

    config_path = data_root / bpe.TOKENIZER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        special = {k: config[k] for k in bpe.HF_SPECIAL_TOKENS if isinstance(config.get(k), str)}
        files = bpe.hf_tokenizer_files(
            special.get("eos_token", eos_token),
            special,
            max_length,
            config.get("chat_template"),
            bool(config.get("clean_up_tokenization_spaces", False)),
        )
    else:
        files = bpe.hf_tokenizer_files(eos_token, None, max_length)
    (out / bpe.TOKENIZER_JSON).write_bytes((data_root / bpe.TOKENIZER_JSON).read_bytes())
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' progress bars off (one bar per save and load is noise in a CLI)."""
    hf_logging = transformers.utils.logging
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(
    run: Path,
    out: Path,
    summary: dict[str, Any],
    cfg: Any,
    data: Any,
    architecture: str,
    note: str,
) -> str:
    """README.md of the export: YAML metadata, the data dir, the mixture trajectory summary
    (``weights_avg`` / ``weights_final`` of summary.json), the final metrics, how to load it."""
    domains = list(summary.get("domains") or data.domains)
    avg, final = summary.get("weights_avg", {}), summary.get("weights_final", {})
    drawn = summary.get("tokens_per_domain", {})
    test, val = summary.get("test") or {}, summary.get("val") or {}
    m = data.manifest
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- mixlab",
        "- data-mixing",
        f"- mixer-{summary.get('mixer', cfg.mixer.name)}",
        "---",
        "",
        f"# {run.name}",
        "",
        f"A {architecture} language model trained with mixlab {summary.get('mixlab_version', '')}"
        f" (mixer `{summary.get('mixer', cfg.mixer.name)}`, seed {summary.get('seed')}): "
        f"{summary.get('steps')} steps, {summary.get('tokens', 0):,} tokens, "
        f"{summary.get('parameters', 0):,} parameters, context {cfg.data.seq_len}.",
        "",
        note,
        "",
        "## Data",
        "",
        f"- data dir: `{cfg.data.dir}` (source `{m.source}`, inputs hash "
        f"`{m.inputs_hash[:16] or '-'}`)",
        f"- tokenizer: vocabulary {m.vocab_size}, end-of-document id {m.eos_id}, "
        f"tokenizer.json sha256 `{m.tokenizer_sha256[:16]}`",
        f"- domains: {', '.join(domains)}",
    ]
    if m.command:
        lines.append(f"- prepared with: `{m.command}`")
    lines += [
        "",
        "## Mixture",
        "",
        "Domain weights the mixer chose: averaged over all training steps (`weights_avg`) and "
        "at the last step (`weights_final`), with the training tokens drawn from each domain.",
        "",
        "| domain | weights_avg | weights_final | tokens drawn |",
        "|---|---:|---:|---:|",
    ]
    for d in domains:
        lines.append(f"| {d} | {_fmt(avg.get(d))} | {_fmt(final.get(d))} | {drawn.get(d, '-')} |")
    lines += [
        "",
        "## Final metrics",
        "",
        "Mean next-token cross-entropy (nats/token) and perplexity per domain, on the fixed "
        "test and validation windows evaluated at the end of training.",
        "",
        "| domain | test loss | test ppl | val loss | val ppl |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in domains:
        row = [
            _fmt((test.get("loss") or {}).get(d)),
            _fmt((test.get("ppl") or {}).get(d)),
            _fmt((val.get("loss") or {}).get(d)),
            _fmt((val.get("ppl") or {}).get(d)),
        ]
        lines.append(f"| {d} | " + " | ".join(row) + " |")
    lines.append(
        f"| **average** | {_fmt(test.get('avg_loss'))} | {_fmt(test.get('avg_ppl'))} | "
        f"{_fmt(val.get('avg_loss'))} | {_fmt(val.get('avg_ppl'))} |"
    )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})",
        "```",
        "",
        "Documents in the training data were each followed by the tokenizer's `eos_token`; "
        "no BOS token was added.",
        "",
    ]
    return "\n".join(lines)


def _refuse_out(out: Path, run: Path, data_root: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` without ``force``, and always one whose replacement would
    delete the run or the data dir being exported."""
    target = out.resolve()
    for what, path in (("run dir", run), ("data dir", data_root)):
        p = path.resolve()
        if target == p or target in p.parents:
            raise MixlabError(f"--hf '{out}' would replace the {what} '{path}'; pick another folder.")
    if out.exists() and not out.is_dir():
        raise MixlabError(f"--hf '{out}' is a file; give a folder for the model.")
    if out.is_dir() and not force and any(out.iterdir()):
        raise MixlabError(f"--hf '{out}' exists and is not empty; pass --force to replace it.")


def export_run(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> Exported:
    """Write finished run ``run_dir`` as a Hugging Face model directory ``out_dir``.

    The directory is built in a temporary sibling and moved into place only once it is
    complete and its logits match mixlab's (``check_logits``): an existing ``out_dir`` (only
    with ``force``) is untouched by a failure. ``MixlabError`` (one line) for a missing or
    unfinished run, an existing non-empty ``out_dir`` without ``force``, or no transformers.
    """
    from mixlab.data.format import DataDir, atomic_dir
    from mixlab.model.hf import HFCausalLM, require_transformers
    from mixlab.train.checkpoint import load_run_model
    from mixlab.train.config import load_config

    run, out = Path(run_dir), Path(out_dir)
    transformers = require_transformers()
    if not (run / "config.toml").is_file() or not (run / "summary.json").is_file():
        raise MixlabError(
            f"'{run}' is not a finished mixlab run (it needs config.toml, summary.json and "
            "model.safetensors)."
        )
    cfg = load_config(run / "config.toml")
    data = DataDir.open(cfg.data.dir)
    _refuse_out(out, run, data.root, force)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    model = load_run_model(run).eval()
    eos_token = data.tokenizer().id_to_token(data.eos_id)
    if eos_token is None:
        raise MixlabError(f"the tokenizer of '{data.root}' has no token for eos id {data.eos_id}.")
    hf = to_hf(model, data.eos_id, cfg.model.dropout)
    architecture = type(hf).__name__
    if isinstance(model, HFCausalLM):
        max_length = getattr(hf.config, "max_position_embeddings", None)
        note = f"Architecture: `{architecture}` (`model.kind = \"hf\"`), saved with `save_pretrained`."
        if model.vocab_size < model.embedding_rows:
            note += (
                f" Its embedding has {model.embedding_rows} rows for the tokenizer's "
                f"{model.vocab_size} ids; the extra rows were never trained on."
            )
    else:
        max_length = model.seq_len
        note = (
            "Architecture: mixlab's GPT, mapped exactly onto `GPT2LMHeadModel` (learned "
            "positions, pre-LayerNorm, tied output layer) with `activation_function = \"gelu\"` "
            "(exact GELU; GPT-2's default is the tanh approximation)."
        )
    with _quiet(transformers), atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp))
        export_tokenizer(data.root, tmp, eos_token, max_length)
        card = model_card(run, out, summary, cfg, data, architecture, note)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        rel = check_logits(model, tmp, cfg.data.seq_len, data.vocab_size)
    return Exported(out, architecture, rel)
