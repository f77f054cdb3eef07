"""Byte-level BPE: exact round trip, EOS handling, balanced sample, loading."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mixlab.data import tokenizer as bpe
from mixlab.errors import DataError

CORPUS = [
    "def f(x):\n    return x * 2\n",
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "数据混合 与 训练",
] * 20


@pytest.fixture(scope="module")
def tok():
    return bpe.train_bpe(CORPUS, vocab_size=300)


def test_trained_vocab_and_eos(tok):
    assert bpe.eos_id(tok) == 0
    assert bpe.MIN_VOCAB <= bpe.vocab_size(tok) <= 300


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading spaces,\ttabs\t\tand\n\nblank lines\n",
        "unseen: Ωmega ☃ 😀 \u200b zero-width",
        "a literal <|endoftext|> inside a document",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    (ids,) = bpe.encode_documents(tok, [text], eos=0)
    assert ids.dtype == np.int64
    assert ids[-1] == 0
    # EOS only ends documents: the literal string is encoded as bytes.
    assert 0 not in ids[:-1].tolist()
    assert bpe.decode(tok, ids) == text


def test_encode_documents_batches_keep_order(tok):
    texts = ["one", "two two", "three three three"]
    batch = bpe.encode_documents(tok, texts, eos=0)
    single = [bpe.encode_documents(tok, [t], eos=0)[0] for t in texts]
    assert [b.tolist() for b in batch] == [s.tolist() for s in single]
    assert [bpe.decode(tok, b) for b in batch] == texts


def test_training_is_deterministic():
    a = bpe.train_bpe(CORPUS, vocab_size=280).to_str()
    b = bpe.train_bpe(CORPUS, vocab_size=280).to_str()
    assert a == b


def test_vocab_too_small():
    with pytest.raises(DataError, match="at least 257 ids"):
        bpe.train_bpe(CORPUS, vocab_size=256)


def test_balanced_sample_takes_equal_bytes_per_domain():
    streams = {
        "a": iter(["aaaa", "aaaa", "aaaa"]),
        "b": iter(["é" * 10]),  # 20 bytes: cut on a character boundary
        "c": iter(["cc"]),  # smaller than its share: gives all it has
    }
    assert list(bpe.balanced_sample(streams, bytes_per_domain=7)) == ["aaaa", "aaa", "ééé", "cc"]


def test_load_tokenizer(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = bpe.load_tokenizer(path)
    text = "The lazy dog."
    assert bpe.encode_documents(loaded, [text], 0)[0].tolist() == (
        bpe.encode_documents(tok, [text], 0)[0].tolist()
    )
    with pytest.raises(DataError, match="does not exist"):
        bpe.load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"is not a Hugging Face tokenizer\.json"):
        bpe.load_tokenizer(bad)
    with pytest.raises(DataError, match="has no token '</s>'"):
        bpe.load_tokenizer(path, eos_token="</s>")
    assert bpe.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(path.read_text())["added_tokens"][0]["content"] == bpe.EOS_TOKEN


# --- given tokenizers: model directories, cached names, data dirs transformers loads ----------
#
# Expected ids come from transformers' own AutoTokenizer on the model directory (or from the
# tokenizer's JSON itself), never from mixlab's encoder.


def _write_corpus(root, n: int = 14) -> dict[str, list[str]]:
    """Two domains of one .txt file per document; returns the texts per domain."""
    words = {
        "alpha": ["river", "stone", "light", "water", "green", "field", "über", "naïve"],
        "beta": ["return", "value", "lambda", "import", "class", "yield", "x_1", "{}"],
    }
    texts = {}
    for d, ws in words.items():
        (root / d).mkdir(parents=True)
        texts[d] = [
            f"{d} document {j}: " + " ".join(ws[(j * 5 + i * (j + 1)) % len(ws)] for i in range(14))
            for j in range(n)
        ]
        for j, t in enumerate(texts[d]):
            (root / d / f"{j:03d}.txt").write_text(t, encoding="utf-8")
    return texts


def _llama_like_tokenizer(texts: list[str]):
    """A Metaspace BPE trained here with <s>, </s>, <unk> and a post-processor that adds <s>
    (so add_special_tokens=True would prepend it): nothing like mixlab's byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


@pytest.fixture
def hf_env(monkeypatch):
    transformers = pytest.importorskip("transformers")
    import huggingface_hub.constants

    # Offline, as the issue asks (HF_HUB_OFFLINE=1): any attempt to reach the hub fails. The
    # constant is read at import, so it is set too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return transformers


def _model_dir(transformers, path, texts):
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_llama_like_tokenizer(texts),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(path)
    return path


def _doc_ids(data, domain: str) -> list[list[int]]:
    out = []
    for s in ("train", "val", "test"):
        sp = data.split(domain, s)
        out += [sp.document(j).tolist() for j in range(sp.n_docs)]
    return out


def test_model_dir_tokenizer_prepares_a_data_dir_that_autotokenizer_loads(hf_env, tmp_path):
    from mixlab.cli import main
    from mixlab.data.format import DataDir

    texts = _write_corpus(tmp_path / "corpus")
    model = _model_dir(hf_env, tmp_path / "model", texts["alpha"] + texts["beta"])
    out = tmp_path / "data"
    rc = main(["prepare", "--source", str(tmp_path / "corpus"), "--out", str(out),
               "--tokenizer", str(model), "--val-fraction", "0.15", "--test-fraction", "0.15",
               "--workers", "1"])  # fmt: skip
    assert rc == 0
    data = DataDir.open(out)
    ref = hf_env.AutoTokenizer.from_pretrained(model, local_files_only=True)
    eos = ref.convert_tokens_to_ids("</s>")
    # --eos-token was not given: the model's own eos_token ends documents.
    assert data.eos_id == eos and data.vocab_size == len(ref)
    # Every document is transformers' encoding of one text (no <s>: special tokens are not
    # added), then EOS; and every text is there.
    expected = {d: sorted(ref(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts[d])
                for d in texts}  # fmt: skip
    for d in texts:
        assert sorted(_doc_ids(data, d)) == expected[d]
    record = data.manifest.extra["tokenizer"]
    assert record["name"] == str(model) and record["kind"] == "directory"
    assert record["sha256"] == data.manifest.tokenizer_sha256
    assert record["special_tokens"] == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # The data dir is itself a tokenizer folder transformers loads, equal to the model's.
    loaded = hf_env.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<s>", "</s>", "<unk>")
    for t in texts["beta"][:4]:
        assert loaded(t)["input_ids"] == ref(t)["input_ids"]
        assert loaded.decode(ref(t, add_special_tokens=False)["input_ids"]) == ref.decode(
            ref(t, add_special_tokens=False)["input_ids"]
        )
    # Same inputs and options: a re-run is a no-op (the directory's tokenizer is hashed).
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert main(["prepare", "--source", str(tmp_path / "corpus"), "--out", str(out),
                 "--tokenizer", str(model), "--val-fraction", "0.15", "--test-fraction", "0.15",
                 "--workers", "1"]) == 0  # fmt: skip
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_cached_model_name_is_found_offline_and_a_missing_one_is_one_line(
    hf_env, tmp_path, monkeypatch, capsys
):
    import huggingface_hub.constants

    from mixlab.cli import main
    from mixlab.data.format import DataDir

    texts = _write_corpus(tmp_path / "corpus")
    # The layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main, snapshots/SHA/}.
    repo = tmp_path / "hub" / "models--local--tiny-tok"
    sha = "0123456789abcdef0123456789abcdef01234567"
    _model_dir(hf_env, repo / "snapshots" / sha, texts["alpha"] + texts["beta"])
    hf_env.GPT2Config(vocab_size=400, n_layer=1, n_embd=8, n_head=2).save_pretrained(
        repo / "snapshots" / sha
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    base = ["prepare", "--source", str(tmp_path / "corpus"), "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "d"), "--tokenizer", "local/tiny-tok"]) == 0
    data = DataDir.open(tmp_path / "d")
    assert data.manifest.extra["tokenizer"]["name"] == "local/tiny-tok"
    assert data.manifest.extra["tokenizer"]["kind"] == "cached"
    assert hf_env.AutoTokenizer.from_pretrained(tmp_path / "d").eos_token == "</s>"
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "e"), "--tokenizer", "local/absent"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not a tokenizer.json file, a model directory or a model in the local Hugging Face " \
        "cache (nothing is downloaded" in err  # fmt: skip
    assert not (tmp_path / "e").exists()


def test_trained_tokenizer_data_dir_loads_with_autotokenizer(hf_env, tmp_path):
    from mixlab.data.format import DataDir
    from mixlab.data.prepare import PrepareConfig, prepare

    texts = _write_corpus(tmp_path / "corpus")
    prepare(PrepareConfig(source=str(tmp_path / "corpus"), out=str(tmp_path / "d"),
                          vocab_size=300, val_fraction=0.15, test_fraction=0.15))  # fmt: skip
    data = DataDir.open(tmp_path / "d")
    record = data.manifest.extra["tokenizer"]
    assert (record["name"], record["kind"], record["special_tokens"]) == (
        "trained", "trained", {"eos_token": bpe.EOS_TOKEN}
    )
    loaded = hf_env.AutoTokenizer.from_pretrained(tmp_path / "d", local_files_only=True)
    assert loaded.eos_token == bpe.EOS_TOKEN and loaded.eos_token_id == data.eos_id
    # The shards hold transformers' encoding of each text followed by EOS.
    for d in texts:
        expected = sorted(loaded(t)["input_ids"] + [data.eos_id] for t in texts[d])
        assert sorted(_doc_ids(data, d)) == expected
    assert loaded.decode(loaded(texts["alpha"][3])["input_ids"]) == texts["alpha"][3]


def _json_tokenizer(vocab: dict[str, int]) -> str:
    """A WordLevel tokenizer.json (whitespace-split words) with the given token -> id map."""
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": vocab[bpe.EOS_TOKEN], "content": bpe.EOS_TOKEN,
                          "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": bpe.EOS_TOKEN},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("vocab", "top"),
    [
        # 65,537 ids: one more than uint16 holds (the example).
        ({bpe.EOS_TOKEN: 0, **{f"w{i}": i for i in range(1, 65537)}}, 65536),
        # 12 tokens, the last with id 70,000: a vocabulary with gaps. Its token count (12)
        # fits uint16, its ids do not: this one used to crash in numpy (OverflowError).
        ({bpe.EOS_TOKEN: 0, **{f"w{i}": i for i in range(1, 11)}, "w65536": 70000}, 70000),
    ],
    ids=["dense-65537", "gaps-to-70000"],
)
def test_ids_past_uint16_get_uint32_shards(tmp_path, vocab, top):
    from mixlab.data.format import DataDir
    from mixlab.data.prepare import PrepareConfig, prepare

    path = tmp_path / "tokenizer.json"
    path.write_text(_json_tokenizer(vocab), encoding="utf-8")
    (tmp_path / "c" / "x").mkdir(parents=True)
    docs = [" ".join(f"w{1 + (j * 7 + i) % 10 if i % 3 else 65536}" for i in range(40))
            for j in range(10)]  # fmt: skip
    for j, t in enumerate(docs):
        (tmp_path / "c" / "x" / f"{j}.txt").write_text(t, encoding="utf-8")
    prepare(PrepareConfig(source=str(tmp_path / "c"), out=str(tmp_path / "d"),
                          tokenizer=str(path), val_fraction=0.2, test_fraction=0.2))  # fmt: skip
    data = DataDir.open(tmp_path / "d")
    assert data.manifest.dtype == "uint32" and data.vocab_size == top + 1
    got = sorted(_doc_ids(data, "x"))
    # The expected ids, from the vocabulary itself: whitespace-split words looked up.
    assert got == sorted([vocab[w] for w in t.split()] + [0] for t in docs)
    assert max(max(d) for d in got) == top


def test_tokenizer_json_saved_with_truncation_keeps_whole_documents(tmp_path):
    # A tokenizer.json saved with truncation (max_length 5) used to cut every document to
    # 5 ids, silently; truncation and padding are switched off when it is loaded.
    from mixlab.data.format import DataDir
    from mixlab.data.prepare import PrepareConfig, prepare

    vocab = {bpe.EOS_TOKEN: 0, **{f"w{i}": i for i in range(1, 20)}}
    spec = json.loads(_json_tokenizer(vocab))
    spec["truncation"] = {"direction": "Right", "max_length": 5, "strategy": "LongestFirst",
                          "stride": 0}  # fmt: skip
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "c" / "x").mkdir(parents=True)
    docs = [" ".join(f"w{1 + (j + i) % 19}" for i in range(30)) for j in range(10)]
    for j, t in enumerate(docs):
        (tmp_path / "c" / "x" / f"{j}.txt").write_text(t, encoding="utf-8")
    prepare(PrepareConfig(source=str(tmp_path / "c"), out=str(tmp_path / "d"),
                          tokenizer=str(path), val_fraction=0.2, test_fraction=0.2))  # fmt: skip
    data = DataDir.open(tmp_path / "d")
    assert sorted(_doc_ids(data, "x")) == sorted([vocab[w] for w in t.split()] + [0] for t in docs)
    # The data dir's own tokenizer.json carries no truncation either.
    assert json.loads((tmp_path / "d" / "tokenizer.json").read_text())["truncation"] is None


def test_model_dir_without_transformers_is_one_clear_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "model").mkdir()
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(DataError, match=r"needs Hugging Face transformers.*mixlab\[hf\]"):
        bpe.load_tokenizer(tmp_path / "model")
    with pytest.raises(DataError, match="tokenizer file or model directory '.*nope' does not"):
        bpe.load_tokenizer(tmp_path / "nope")


def test_wrong_eos_token_names_the_models_own(hf_env, tmp_path):
    model = _model_dir(hf_env, tmp_path / "model", ["some text here"] * 10)
    with pytest.raises(DataError, match=r"has no token '<\|endoftext\|>'.*\('</s>' for this one\)"):
        bpe.load_tokenizer(model)
    assert bpe.default_eos_token(model) == "</s>"
    assert bpe.default_eos_token("") == bpe.EOS_TOKEN


def test_ids_past_uint32_are_one_line_before_any_text_is_read(tmp_path, monkeypatch, capsys):
    # tokenizers' ids are u32, so no real tokenizer.json gets here: its size is faked. The
    # refusal comes when the tokenizer is loaded, before the corpus is read.
    from mixlab.cli import main

    _write_corpus(tmp_path / "corpus")
    path = tmp_path / "tokenizer.json"
    path.write_text(_json_tokenizer({bpe.EOS_TOKEN: 0, "w1": 1}), encoding="utf-8")
    monkeypatch.setattr(bpe, "vocab_size", lambda tok: 2**32 + 5)
    rc = main(["prepare", "--source", str(tmp_path / "corpus"), "--out", str(tmp_path / "d"),
               "--tokenizer", str(path)])  # fmt: skip
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        "has ids up to 4,294,967,300, more than uint32 shards hold (4,294,967,296 ids); use a "
        "tokenizer with fewer ids."
    )
    assert not (tmp_path / "d").exists()
