"""The Hugging Face causal-LM adapter: tiny randomly initialised models only, no hub access."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from mixlab.errors import ConfigError
from mixlab.model import ModelConfig, attention_impl, build_model, count_parameters, per_sample_loss

V, S = 64, 16
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32}
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def hf(options: dict, seed: int = 0, attention: str = "sdpa", vocab: int = V):
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind="hf", hf_options=options, attention=attention), vocab, S)


def tokens(b: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (b, S + 1), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [GPT2 | NO_DROPOUT, LLAMA], ids=["gpt2", "llama"])
def test_tiny_model_runs_forward_and_backward(transformers, options):
    from mixlab.model.hf import HFCausalLM

    model = hf(options)
    assert isinstance(model, HFCausalLM)
    assert model.vocab_size == V and model.hf.config.vocab_size == V
    assert model.hf.config.model_type == options["model_type"]
    batch = tokens()
    assert model(batch[:, :-1]).shape == (3, S, V)
    loss = per_sample_loss(model, batch)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert count_parameters(model) == sum(p.numel() for p in model.hf.parameters())


@pytest.mark.parametrize("options", [GPT2 | NO_DROPOUT, LLAMA], ids=["gpt2", "llama"])
def test_init_is_deterministic_under_manual_seed(transformers, options):
    a, b, c = hf(options, seed=2), hf(options, seed=2), hf(options, seed=3)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("options", [GPT2 | NO_DROPOUT, LLAMA], ids=["gpt2", "llama"])
def test_math_path_is_eager_attention_and_agrees_with_sdpa(transformers, options):
    model = hf(options).eval()
    assert model.hf.config._attn_implementation == "sdpa"
    batch = tokens()
    sdpa = per_sample_loss(model, batch)
    with attention_impl(model, "math"):
        assert model.attention == "math"
        assert model.hf.config._attn_implementation == "eager"
        math_ = per_sample_loss(model, batch)
    assert model.hf.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, math_, atol=1e-5, rtol=0)
    built_math = hf(options, attention="math")
    assert built_math.attention == "math"
    assert built_math.hf.config._attn_implementation == "eager"


def test_jvp_through_eager_llama_equals_directional_derivative(transformers):
    model = hf(LLAMA).eval()
    batch = tokens()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    with attention_impl(model, "math"):
        _, dloss = torch.func.jvp(lambda p: per_sample_loss(model, batch, p), (params,), (v,))
        losses = per_sample_loss(model, batch)
        names, leaves = zip(*model.named_parameters())
        ref = []
        for i in range(3):
            grads = torch.autograd.grad(losses[i], leaves, retain_graph=True)
            ref.append(sum((g * v[n]).sum() for n, g in zip(names, grads)))
    ref = torch.stack(ref).detach()
    torch.testing.assert_close(dloss, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_config_file_vocab_is_replaced_and_options_override_it(transformers, tmp_path):
    # A copied GPT-2 architecture file: its 50257-id vocabulary belongs to another tokenizer.
    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32).save_pretrained(
        tmp_path
    )
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 50257
    cfg = ModelConfig(kind="hf", hf_config=str(tmp_path), hf_options={"n_layer": 1})
    model = build_model(cfg, V, S)
    assert model.vocab_size == V
    assert model.hf.config.n_layer == 1 and model.hf.config.n_embd == 32
    assert model.hf.config.eos_token_id is None  # 50256 would index past the vocabulary
    by_file = build_model(ModelConfig(kind="hf", hf_config=str(tmp_path / "config.json")), V, S)
    assert by_file.hf.config.n_layer == 2


def test_pretrained_dir_loads_and_vocab_mismatch_is_refused(transformers, tmp_path):
    source = hf(GPT2 | NO_DROPOUT, seed=4).eval()
    source.hf.save_pretrained(tmp_path)
    cfg = ModelConfig(kind="hf", hf_pretrained=str(tmp_path))
    loaded = build_model(cfg, V, S)
    assert loaded.training and loaded.hf.training  # like every freshly built model
    loaded.eval()
    batch = tokens()
    torch.testing.assert_close(per_sample_loss(loaded, batch), per_sample_loss(source, batch))
    with pytest.raises(ConfigError, match="vocabulary of 64 ids but the data's tokenizer has 100"):
        build_model(cfg, 100, S)
    with pytest.raises(ConfigError, match="vocab_size cannot change a pretrained model"):
        build_model(
            ModelConfig(kind="hf", hf_pretrained=str(tmp_path), hf_options={"vocab_size": 64}), V, S
        )
    with pytest.raises(ConfigError, match=r"not a local directory with a config\.json"):
        build_model(ModelConfig(kind="hf", hf_pretrained=str(tmp_path / "missing")), V, S)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (GPT2 | {"vocab_size": 50257}, "vocab_size = 50257 but the data's tokenizer has 64"),
        (GPT2 | {"n_positions": 8}, "allows 8 positions .* seq_len 16"),
        ({"model_type": "gtp2"}, "unknown HF model_type 'gtp2'. Did you mean 'gpt2'"),
        (LLAMA | {"hidden_size": 30}, "transformers rejected the config"),
        ({"model_type": "t5", "d_model": 32}, "transformers cannot build a causal LM"),
    ],
)
def test_bad_hf_options_are_config_errors(transformers, options, message):
    with pytest.raises(ConfigError, match=message):
        hf(options)


def test_missing_config_file_is_a_config_error(transformers, tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_model(ModelConfig(kind="hf", hf_config=str(tmp_path / "nope.json")), V, S)


def test_without_transformers_mixlab_imports_and_hf_is_a_clear_error(monkeypatch):
    # None in sys.modules makes `import transformers` raise ImportError.
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in [m for m in sys.modules if m == "mixlab" or m.startswith("mixlab.")]:
        monkeypatch.delitem(sys.modules, name)
    fresh = importlib.import_module("mixlab.model")
    assert fresh.build_model(fresh.ModelConfig(), V, S)(tokens()[:, :-1]).shape == (3, S, V)
    cfg = fresh.ModelConfig(kind="hf", hf_options=GPT2)
    with pytest.raises(Exception, match=r"pip install 'mixlab\[hf\]'") as info:
        fresh.build_model(cfg, V, S)
    assert type(info.value).__name__ == "ConfigError"


def test_pretrained_embedding_larger_than_the_tokenizer_is_accepted(transformers, tmp_path, caplog):
    # Embeddings padded past the tokenizer (72 rows for 64 ids, as models pad to a multiple
    # of 64/128) are accepted: no data id reaches the extra rows, and their logit columns are
    # left out, so the loss is the cross-entropy over the data's 64 ids.
    torch.manual_seed(5)
    fields = {k: v for k, v in GPT2.items() if k != "model_type"} | NO_DROPOUT
    config = transformers.GPT2Config(**fields, vocab_size=72, bos_token_id=None, eos_token_id=None)
    padded = transformers.GPT2LMHeadModel(config).eval()
    padded.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="mixlab.model.hf"):
        model = build_model(ModelConfig(kind="hf", hf_pretrained=str(tmp_path)), V, S).eval()
    assert model.vocab_size == V and model.embedding_rows == 72
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mixlab.model.hf"]
    assert "72 embedding rows for the data's 64 token ids; rows 64..71 are never sampled" in line
    batch = tokens()
    with torch.no_grad():
        logits = model(batch[:, :-1])
        full = padded(input_ids=batch[:, :-1]).logits  # transformers' own forward, all 72
    assert logits.shape == (3, S, V)
    torch.testing.assert_close(logits, full[..., :V], rtol=0, atol=0)
    # Reference loss by hand: log-softmax over the first 64 columns only.
    logp = full[..., :V].log_softmax(-1).gather(-1, batch[:, 1:, None])[..., 0]
    # Same float32 ops in another order (cross_entropy's fused kernel): ~1e-7 relative.
    torch.testing.assert_close(per_sample_loss(model, batch), -logp.mean(1), rtol=1e-6, atol=1e-6)
    # A smaller embedding than the tokenizer still cannot work (ids past it): refused.
    with pytest.raises(ConfigError, match="vocabulary of 72 ids but the data's tokenizer has 80"):
        build_model(ModelConfig(kind="hf", hf_pretrained=str(tmp_path)), 80, S)
