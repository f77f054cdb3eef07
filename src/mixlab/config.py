"""Typed configuration helpers shared by every config dataclass.

Configs are dataclasses whose fields carry a docstring on the line(s) under them (as in litgpt).
TOML files and ``--set key=value`` overrides are thin layers over them: ``from_dict`` builds a
dataclass tree and rejects unknown keys with the closest valid key as a suggestion.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import sys
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mixlab.errors import ConfigError

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def suggest(name: str, options: typing.Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest option, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats), or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}.")
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}.")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        (arg,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}.")
        _, varg = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, varg, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are errors with a suggestion."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    # A section whose layout changed reads its old one (``WeightingConfig.upgrade_layout``).
    upgrade = getattr(cls, "upgrade_layout", None)
    if upgrade is not None:
        data = upgrade(data)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'.{suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        prefix = f"{where}: " if where and not str(exc).startswith(where) else ""
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass tree as plain dicts, with None values dropped (TOML has no null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as a TOML literal, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.steps=100).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key.")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` override set (tables created as needed)."""
    out = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{k}' is a value, not a table.")
            node = nxt
        node[keys[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with a clear error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist.")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{p}' is not valid TOML: {exc}") from None


def describe(
    cls: type,
    prefix: str = "",
    instance: Any = None,
    subtables: typing.Mapping[str, Subtable] | None = None,
    given: typing.Collection[str] | None = None,
) -> str:
    """The full config as commented TOML: every field with its default and its docstring.

    The text is valid TOML that loads back into an equal config (``mixlab train
    --print-config`` output can be fed back as the config file): scalars come before the
    sub-tables of their table, a value that is None is a comment (TOML has no null), and a
    dict-valued field is an inline table, unless ``subtables`` names it (see ``Subtable``).
    With ``given``, fields not in it are written as comments (``# name = default``), so that
    loading the text back leaves them unset, as they were.
    """
    instance = instance if instance is not None else cls()
    subtables = subtables or {}
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    scalars: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        doc = docs.get(f.name, "")
        comment = "".join(f"# {line}\n" for line in doc.splitlines())
        name = f"{prefix}{f.name}"
        sub = subtables.get(name)
        if sub is not None:
            head = comment + "".join(f"# {line}\n" for line in sub.note.splitlines())
            body = describe(sub.cls, f"{name}.", sub.instance, subtables, sub.given)
            tables.append(f"{head}[{_dotted(name)}]\n{body}")
            continue
        if _is_dataclass_type(hints[f.name]) or dataclasses.is_dataclass(value):
            if doc:
                tables.append(comment.rstrip("\n"))
            body = describe(type(value), f"{name}.", value, subtables)
            tables.append(f"[{_dotted(name)}]\n{body}")
            continue
        if value is None:
            scalars.append(f"{comment}# {_key(f.name)} = (unset)")
        elif given is not None and f.name not in given:
            scalars.append(f"{comment}# {_key(f.name)} = {_inline(value)}")
        else:
            scalars.append(f"{comment}{_key(f.name)} = {_inline(value)}")
    return "\n".join(scalars + ([""] if scalars and tables else []) + tables) + "\n"


class Subtable(typing.NamedTuple):
    """How ``describe`` writes a dict-valued field whose entries are a dataclass's fields (e.g.
    ``mixer.options``, the options of the chosen mixer): as the ``[name]`` table of ``cls``,
    each entry with its docstring, under the comment ``note``, in place of the inline table, so
    the table is declared once."""

    cls: type
    instance: Any
    """The dataclass built from the dict (defaults filled in)."""
    note: str = ""
    given: typing.Collection[str] | None = None
    """The dict's keys: the other fields are written as comments with their defaults."""


def _dotted(name: str) -> str:
    """A dotted table name with each part quoted as TOML needs."""
    return ".".join(_key(part) for part in name.split("."))


def _inline(value: Any) -> str:
    """A TOML value on one line (tables as inline tables), so it stays under its own header."""
    import tomli_w

    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = ") :]


def _key(k: str) -> str:
    """A TOML key: bare when TOML allows (A-Za-z0-9_-), else a basic string with its escapes."""
    import tomli_w

    if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
        return k
    return tomli_w.dumps({"v": str(k)}).strip()[len("v = ") :]
