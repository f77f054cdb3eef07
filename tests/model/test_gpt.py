"""The GPT, its two attention paths, per_sample_loss, ModelConfig and build_model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixlab.config import from_dict
from mixlab.errors import ConfigError
from mixlab.model import (
    GPT,
    ModelConfig,
    attention_impl,
    build_model,
    count_parameters,
    per_sample_loss,
)

V, S = 64, 16


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = {"n_layer": 2, "n_head": 2, "d_model": 32} | kw
    return GPT(V, S, **args)


def batch(b: int = 4, t: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t + 1), generator=torch.Generator().manual_seed(seed))


def directional_by_backward(model: nn.Module, tokens: torch.Tensor, v: dict) -> torch.Tensor:
    """[b] <grad of sample i's loss, v>, one backward per sample (the slow reference)."""
    names, params = zip(*model.named_parameters())
    losses = per_sample_loss(model, tokens)
    out = []
    for i in range(losses.numel()):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True)
        out.append(sum((g * v[n]).sum() for n, g in zip(names, grads)))
    return torch.stack(out).detach()


def test_logits_shape_for_full_and_shorter_context():
    model = tiny()
    assert model(batch(3)[:, :-1]).shape == (3, S, V)
    assert model(batch(2, t=5)[:, :-1]).shape == (2, 5, V)
    with pytest.raises(ValueError, match="built for 16"):
        model(torch.zeros(1, S + 1, dtype=torch.long))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(impl):
    model = tiny(attention=impl).eval()
    idx = batch(2)[:, :-1]
    k = 9
    changed = idx.clone()
    changed[:, k] = (changed[:, k] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :k], b[:, :k])
    assert (a[:, k:] - b[:, k:]).abs().amax(dim=-1).gt(1e-4).all()


def test_output_layer_is_tied_to_token_embedding():
    model = tiny()
    assert model.head.weight is model.tok_emb.weight
    per_sample_loss(model, batch()).sum().backward()
    # One tensor, one gradient: the input and output uses both land in it.
    assert model.tok_emb.weight.grad is model.head.weight.grad
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names


def test_count_parameters_counts_the_tied_matrix_once():
    # Per block: 2 LayerNorms (4d), qkv (3d^2 + 3d), attn proj (d^2 + d), fc (4d^2 + 4d),
    # mlp proj (4d^2 + d) = 12 d^2 + 13 d; plus token and position embeddings and ln_f.
    model = GPT(2048, 128, n_layer=2, n_head=2, d_model=64)
    d = 64
    assert count_parameters(model) == 2048 * d + 128 * d + 2 * (12 * d * d + 13 * d) + 2 * d
    assert count_parameters(model) == 239_360


def test_gpt2_init_scales_residual_projections():
    model = GPT(V, S, n_layer=4, n_head=2, d_model=128)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    resid = 0.02 / math.sqrt(2 * 4)
    assert block.attn.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.count_nonzero(block.mlp.fc.bias) == 0
    assert torch.equal(block.ln1.weight, torch.ones(128))


def test_init_is_deterministic_under_manual_seed():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tok_emb.weight"], sc["tok_emb.weight"])
    assert "blocks.0.attn.causal_mask" not in sa  # derived from seq_len, not checkpointed


def test_sdpa_and_math_paths_agree_in_loss_and_gradients():
    model = tiny()
    tokens = batch()
    grads = {}
    losses = {}
    for impl in ("sdpa", "math"):
        model.zero_grad()
        with attention_impl(model, impl):
            loss = per_sample_loss(model, tokens)
            loss.mean().backward()
        losses[impl] = loss.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses["sdpa"], losses["math"], atol=1e-5, rtol=0)
    for name in grads["sdpa"]:
        torch.testing.assert_close(grads["sdpa"][name], grads["math"][name], atol=1e-5, rtol=0)
    with torch.no_grad():
        idx = tokens[:, :-1]
        model.attention = "math"
        math_logits = model(idx)
        model.attention = "sdpa"
        torch.testing.assert_close(model(idx), math_logits, atol=1e-5, rtol=0)


def test_attention_impl_switches_every_block_and_restores_on_exit_and_on_error():
    model = tiny(attention="sdpa")
    with attention_impl(model, "math") as m:
        assert m is model
        assert model.attention == "math"
        assert {blk.attn.impl for blk in model.blocks} == {"math"}
    assert model.attention == "sdpa"
    assert {blk.attn.impl for blk in model.blocks} == {"sdpa"}
    with pytest.raises(RuntimeError, match="boom"), attention_impl(model, "math"):
        raise RuntimeError("boom")
    assert model.attention == "sdpa"
    with pytest.raises(ConfigError, match="'flash' is not one of 'sdpa', 'math'"):
        attention_impl(model, "flash").__enter__()
    assert model.attention == "sdpa"


def test_attention_impl_sees_through_a_ddp_style_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = tiny()
    with attention_impl(Wrapper(model), "math"):
        assert model.attention == "math"
    assert model.attention == "sdpa"
    with (
        pytest.raises(TypeError, match="no switchable attention"),
        attention_impl(nn.Linear(2, 2), "math"),
    ):
        pass


def test_jvp_through_math_path_equals_directional_derivative_from_backward():
    model = tiny().eval()
    tokens = batch()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    with attention_impl(model, "math"):
        loss, dloss = torch.func.jvp(lambda p: per_sample_loss(model, tokens, p), (params,), (v,))
        ref = directional_by_backward(model, tokens, v)
    assert dloss.shape == (4,)
    torch.testing.assert_close(loss, per_sample_loss(model, tokens).detach(), rtol=0, atol=0)
    torch.testing.assert_close(dloss, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_jvp_through_sdpa_path_on_cpu_raises_or_agrees_with_math():
    # torch 2.13 CPU: SDPA dispatches to _scaled_dot_product_flash_attention_for_cpu, which has
    # no forward-AD formula, so jvp raises NotImplementedError. Should a later torch add one,
    # the result must equal the math path's.
    model = tiny().eval()
    tokens = batch()
    params = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.ones_like(p) for n, p in params.items()}

    def f(p):
        return per_sample_loss(model, tokens, p)

    try:
        _, sdpa = torch.func.jvp(f, (params,), (v,))
    except NotImplementedError as exc:
        assert "forward AD" in str(exc)
        return
    with attention_impl(model, "math"):
        _, math_ = torch.func.jvp(f, (params,), (v,))
    torch.testing.assert_close(sdpa, math_, rtol=1e-5, atol=1e-5)


def test_per_sample_loss_equals_hand_loop_of_cross_entropy():
    model = tiny()
    tokens = batch(3)
    got = per_sample_loss(model, tokens)
    with torch.no_grad():
        want = torch.stack([F.cross_entropy(model(row[None, :-1])[0], row[1:]) for row in tokens])
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
    assert got.detach().mean().item() == pytest.approx(math.log(V), rel=0.05)  # init ~ uniform
    with pytest.raises(ValueError, match=r"\[b, T\+1\]"):
        per_sample_loss(model, tokens[:, :1])


def test_per_sample_loss_is_float32_under_bf16_autocast():
    model = tiny()
    tokens = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens[:, :-1]).dtype == torch.bfloat16
        loss = per_sample_loss(model, tokens)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, per_sample_loss(model, tokens), rtol=0.02, atol=0)


def test_per_sample_loss_with_params_uses_them_and_keeps_ties():
    model, other = tiny(seed=0), tiny(seed=5)
    tokens = batch()
    params = dict(other.named_parameters())
    torch.testing.assert_close(
        per_sample_loss(model, tokens, params), per_sample_loss(other, tokens)
    )
    # Replacing only the token embedding replaces the tied output layer as well.
    emb = {"tok_emb.weight": other.tok_emb.weight}
    with torch.no_grad():
        model.tok_emb.weight.copy_(other.tok_emb.weight)
        want = per_sample_loss(model, tokens)
    assert torch.equal(per_sample_loss(tiny(seed=0), tokens, emb), want)


def test_adamw_on_a_repeated_batch_reduces_the_loss():
    model = tiny()
    tokens = batch(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(15):
        loss = per_sample_loss(model, tokens).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_dropout_is_active_in_training_only():
    model = tiny(dropout=0.5)
    idx = batch(2)[:, :-1]
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_build_model_makes_the_configured_gpt():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=3, n_head=4, d_model=32, attention="math")
    model = build_model(cfg, vocab_size=V, seq_len=S)
    assert isinstance(model, GPT)
    assert len(model.blocks) == 3 and model.blocks[0].attn.n_head == 4
    assert model.attention == "math"
    assert count_parameters(model) == V * 32 + S * 32 + 3 * (12 * 32 * 32 + 13 * 32) + 64
    with pytest.raises(ConfigError, match="positive"):
        build_model(cfg, vocab_size=0, seq_len=S)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_head": 4}, r"d_model \(30\) must be divisible by model.n_head \(4\)"),
        ({"n_layer": 0}, "model.n_layer must be at least 1"),
        ({"dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
        ({"attention": "flash"}, "model.attention 'flash' is not one of"),
        ({"kind": "bert"}, "model.kind 'bert' is not one of"),
        ({"hf_config": "x.json"}, "model.hf_config is only used with model.kind = 'hf'"),
        ({"kind": "hf"}, "needs model.hf_config, model.hf_pretrained, or model.hf_options"),
        ({"kind": "hf", "hf_config": "a", "hf_pretrained": "b"}, "not both"),
        (
            {"kind": "hf", "hf_config": "a", "hf_options": {"model_type": "gpt2"}},
            "model_type is only used without hf_config",
        ),
    ],
)
def test_model_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


def test_model_config_from_dict():
    cfg = from_dict(ModelConfig, {"d_model": 96, "n_layer": 3, "attention": "math"})
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.attention) == (96, 3, 2, "math")
    with pytest.raises(ConfigError, match="'sdpaa' is not one of"):
        from_dict(ModelConfig, {"attention": "sdpaa"})
    cfg = from_dict(ModelConfig, {"kind": "hf", "hf_options": {"model_type": "gpt2", "n_layer": 1}})
    assert cfg.hf_options == {"model_type": "gpt2", "n_layer": 1}
