"""Generated English-like text corpora, for tests and benchmarks of ``prepare`` (no downloads).

Words are made of syllables and drawn with Zipf frequencies; each domain ranks the vocabulary
differently, so domains differ. Documents are random runs of a fixed stock of sentences (a
few thousand per domain) grouped into paragraphs, which writes hundreds of MB in seconds while
giving a BPE tokenizer text of about 4 bytes per token at 8k ids, like English prose.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

_SYLLABLES = (
    "a",
    "e",
    "i",
    "o",
    "u",
    "an",
    "ar",
    "as",
    "at",
    "be",
    "ca",
    "co",
    "de",
    "di",
    "el",
    "en",
    "er",
    "es",
    "in",
    "is",
    "it",
    "la",
    "le",
    "li",
    "lo",
    "ma",
    "me",
    "mi",
    "mo",
    "na",
    "ne",
    "no",
    "on",
    "or",
    "ra",
    "re",
    "ri",
    "ro",
    "sa",
    "se",
    "si",
    "so",
    "ta",
    "te",
    "ti",
    "to",
    "tra",
    "tri",
    "un",
    "ur",
    "ve",
    "vi",
    "ba",
    "bo",
    "fa",
    "fe",
    "fi",
    "go",
    "gu",
    "ha",
    "he",
    "ho",
    "ka",
    "ke",
    "ku",
    "pa",
    "pe",
    "pi",
    "po",
    "pu",
    "sta",
    "ste",
    "sto",
    "pla",
    "ple",
    "pro",
    "bra",
    "bre",
    "cri",
    "dra",
    "fre",
    "gri",
    "ol",
    "ul",
    "il",
    "al",
    "ek",
    "ok",
    "ax",
    "ex",
)


def _vocabulary(rng: np.random.Generator, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(rng.choice(_SYLLABLES, k)))
    return sorted(words)


def _sentences(rng: np.random.Generator, vocab: list[str], n: int) -> list[str]:
    ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.0)
    cdf /= cdf[-1]
    order = rng.permutation(len(vocab))  # this domain's frequent words
    out = []
    for _ in range(n):
        idx = order[np.searchsorted(cdf, rng.random(int(rng.integers(5, 22))))]
        words = [vocab[i] for i in idx]
        if rng.random() < 0.3:
            words.insert(int(rng.integers(0, len(words))), str(int(rng.integers(0, 2000))))
        if rng.random() < 0.3:
            words[int(rng.integers(0, len(words)))] += ","
        out.append(
            words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice([".", ".", "?", "!"])
        )
    return out


def write_text_corpus(
    root: str | Path,
    mb: float,
    domains: tuple[str, ...] = ("alpha", "beta"),
    *,
    seed: int = 0,
    doc_bytes: int = 4000,
    file_mb: float = 64.0,
) -> int:
    """Write about ``mb`` MB (10^6 bytes) of text as ``root/<domain>/part-NNNN.jsonl`` files (field
    ``text``, one document per line, at most ``file_mb`` MB per file), equal parts per domain.

    Documents average ``doc_bytes`` bytes (exponentially distributed, at least 200). Returns the
    UTF-8 bytes of text written. The same arguments write the same files.
    """
    root = Path(root)
    vocab = _vocabulary(np.random.default_rng(seed), 50_000)
    per_domain = int(mb * 1e6 / len(domains))
    total = 0
    for d in domains:
        rng = np.random.default_rng([seed, zlib.crc32(d.encode())])
        stock = _sentences(rng, vocab, 8000)
        folder = root / d
        folder.mkdir(parents=True, exist_ok=True)
        written, part, j = 0, 0, 0
        fh = None
        try:
            while written < per_domain:
                if fh is None or fh.tell() >= file_mb * 1e6:
                    if fh is not None:
                        fh.close()
                    fh = open(folder / f"part-{part:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
                    part += 1
                size = max(200, int(rng.exponential(doc_bytes)))
                picks = rng.integers(0, len(stock), size // 60 + 1).tolist()
                paragraphs = [
                    " ".join(stock[i] for i in picks[k : k + 6]) for k in range(0, len(picks), 6)
                ]
                text = f"{d} {j}. " + "\n\n".join(paragraphs)
                fh.write(json.dumps({"text": text}) + "\n")
                n = len(text.encode("utf-8"))
                written += n
                j += 1
            total += written
        finally:
            if fh is not None:
                fh.close()
    return total
