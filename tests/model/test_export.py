"""mixlab export RUN --hf DIR: a directory transformers loads with no custom code, whose
logits are mixlab's. The reference is transformers' own forward (GPT2LMHeadModel,
LlamaForCausalLM), an implementation independent of mixlab's GPT."""

from __future__ import annotations

import json

import pytest
import torch
from tests.train.conftest import tiny_overrides

from mixlab.cli import main

# Tolerance of the logit comparison, float32: both sides run the same operations on the same
# float32 weights and may only order sums differently (a fused addmm against Conv1D's addmm on
# the transposed matrix, SDPA against eager attention). For these d=32, two-layer models each
# logit is a short chain of length-32/128 dot products: a few ulp (6e-8) x sqrt(128) of
# relative error per product, ~1e-6 through the chain (measured: 0 with the same attention
# kernel, 4.7e-7 of the largest logit for SDPA against eager). 1e-5 of the logits' largest
# magnitude bounds that with room, and is 15x below the smallest real mapping error tried:
# GPT-2's default tanh GELU at O(1) weights moves logits by 1.6e-4 of their scale (a missing
# q/k/v bias by 0.45), which the random-weights test checks is caught.
RTOL = 1e-5


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _train(root, extra=()):
    from mixlab.data.synthetic import make_synthetic_datadir
    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    torch.set_num_threads(1)
    data = make_synthetic_datadir(root / "data", {"a": 40, "b": 40, "c": 10}, vocab_size=64)
    overrides = tiny_overrides(data, ["mixer.name='aioli'", "model.n_layer=2", *extra])
    summary = train(load_config(None, overrides), root / "run")
    return root / "run", data, summary


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, transformers):
    return _train(tmp_path_factory.mktemp("gpt"))


def _val_batch(data_root, n: int = 4, t: int = 16) -> torch.Tensor:
    """Real token windows [n, t] from the validation split (not random ids)."""
    from mixlab.data.format import DataDir

    sp = DataDir.open(data_root).split("a", "val")
    ids = torch.cat([torch.as_tensor(sp.document(j).astype("int64")) for j in range(sp.n_docs)])
    return ids[: n * t].view(n, t)


def _logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_gpt_to_gpt2_mapping_is_exact_for_weights_where_every_detail_shows(transformers, attention):
    # A trained tiny run has biases and LayerNorm shifts near 0 and small pre-activations, so a
    # missing bias or the tanh GELU would hide in it. Here every parameter is drawn at O(1)
    # scale (MLP pre-activations ~N(0, 1.7^2), where the two GELUs differ by ~1e-4).
    from mixlab.model.export import to_hf
    from mixlab.model.gpt import GPT

    torch.manual_seed(3)
    gpt = GPT(64, 16, n_layer=2, n_head=4, d_model=32, attention=attention).eval()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.normal_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0,
                      0.3)  # fmt: skip
    batch = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(4))
    hf = to_hf(gpt, eos_id=0)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        ref = gpt(batch)
        _logits_close(hf(input_ids=batch).logits, ref)
        # GPT-2's default activation (tanh GELU) is another function, and the tolerance tells
        # it apart: the comparison has teeth.
        hf.config.activation_function = "gelu_new"
        approx = transformers.GPT2LMHeadModel(hf.config).eval()
        approx.load_state_dict(hf.state_dict())
        diff = (approx(input_ids=batch).logits - ref).abs().max().item()
    assert diff > 5 * RTOL * ref.abs().max().item()


def test_exported_gpt_is_gpt2_with_mixlabs_logits_tokenizer_and_card(gpt_run, transformers, tmp_path):
    from mixlab.train.loop import load_run_model

    run, data_root, summary = gpt_run
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.activation_function == "gelu" and model.config.tie_word_embeddings
    batch = _val_batch(data_root)
    with torch.no_grad():
        ref = load_run_model(run).eval()(batch)
        got = model(input_ids=batch).logits
    _logits_close(got, ref)

    # The tokenizer: the synthetic data dir's word-level vocabulary ("w{i}" is id i, 0 = EOS).
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("w1 w5 w63")["input_ids"] == [1, 5, 63]
    assert (tok.eos_token, tok.eos_token_id, tok.model_max_length) == ("<|endoftext|>", 0, 16)

    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"data dir: `{data_root}`" in card
    for d in ("a", "b", "c"):
        w_avg, w_fin = summary["weights_avg"][d], summary["weights_final"][d]
        assert f"| {d} | {w_avg:.4f} | {w_fin:.4f} | {summary['tokens_per_domain'][d]} |" in card
        assert f"| {d} | {summary['test']['loss'][d]:.4f} | {summary['test']['ppl'][d]:.4f} |" in card
    assert f"| **average** | {summary['test']['avg_loss']:.4f} |" in card
    assert "mixer `aioli`" in card


def test_existing_non_empty_dir_needs_force_and_failures_leave_it_alone(
    gpt_run, transformers, tmp_path, capsys, monkeypatch
):
    run, _, _ = gpt_run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mixlab export: error: --hf '{out}' exists and is not empty; pass --force "
                   "to replace it."]  # fmt: skip
    assert (out / "keep.txt").read_text() == "mine"
    # A failure half way (here: the logit check) leaves the old folder and no temporary one.
    import mixlab.model.export as export

    def broken(*_a, **_k):
        raise export.MixlabError("boom")

    monkeypatch.setattr(export, "check_logits", broken)
    assert main(["export", str(run), "--hf", str(out), "--force"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.undo()
    assert main(["export", str(run), "--hf", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # An empty folder needs no --force; the run dir itself is never replaced.
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), "--hf", str(tmp_path / "empty")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(run), "--force"]) == 2
    assert "would replace the run dir" in capsys.readouterr().err
    assert (run / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "nothing"), "--hf", str(tmp_path / "x")]) == 2
    assert "is not a finished mixlab run" in capsys.readouterr().err


def test_hf_kind_run_is_saved_with_save_pretrained(transformers, tmp_path):
    from mixlab.train.loop import load_run_model

    llama = {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }  # fmt: skip
    options = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in llama.items()) + "}"
    run, data_root, _ = _train(tmp_path, ["model.kind='hf'", f"model.hf_options={options}"])
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    batch = _val_batch(data_root)
    with torch.no_grad():
        _logits_close(model(input_ids=batch).logits, load_run_model(run).eval()(batch))
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    assert "`LlamaForCausalLM` (`model.kind = \"hf\"`)" in (out / "README.md").read_text()
