"""The one config mechanism of specfm: typed dataclass trees from YAML and dotted ``key=value`` overrides.

Every configurable part (pretraining runs, data pipelines, model arguments, fine-tuning tasks, benchmark
suites) is a tree of dataclasses whose defaults are the documentation; a YAML file only overrides them.
This module builds such a tree from plain data and is the only place that does. Guarantees:

- **Unknown keys** are a :class:`ConfigError` that names the section (``'optim'``, ``'stages.0'``) and
  lists the valid keys.
- **Overrides** (:func:`apply_overrides`) are dotted paths into the same tree, list entries by index
  (``optim.lr=1e-4``, ``stages.0.steps=10``, ``data.sources.1.subset=3``); a value is read as YAML
  (scalars, ``[a, b]``, ``{k: v}``); an index past the end of a list is an error naming its length.
- **Types** come from the fields' annotations and are checked where the value is read: ``int``, ``float``,
  ``str``, ``bool``, ``None`` in a union, ``list[X]``, ``tuple[X, Y]``/``tuple[X, ...]``, ``dict[str, X]``,
  ``Literal[...]`` and nested dataclasses. A ``float`` field takes an int and also ``1e-4``, which PyYAML
  (YAML 1.1) reads as a *string* (the "float fix"); in untyped content (``dict``, ``Any``), strings that
  look like floats become floats. A wrong type is an error naming the dotted key, the value and the type.
- **Checks** in a dataclass's ``__post_init__`` run as the tree is built; a :class:`UserError` of another
  kind raised there (a ``DataError``, a ``ModelError``) becomes this loader's error class with the dotted
  key in front, the original chained.

``data_prep`` is the bottom layer, so ``pretrain`` and ``finetune`` build their configs with this module.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import UserError


class ConfigError(UserError):
    """A configuration key or value is invalid; the message names the key, the value and what was expected."""


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def fix_floats(obj: Any) -> Any:
    """Strings that are floats in YAML 1.2 (``1e-4``, ``+1.5E3``) -> float, recursively; the rest unchanged."""
    if isinstance(obj, dict):
        return {k: fix_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fix_floats(v) for v in obj]
    if isinstance(obj, str) and _FLOAT.match(obj) and any(c in obj for c in ".eE"):
        return float(obj)
    return obj


# ----------------------------------------------------------------------------- reading and overriding

def read_yaml(path: str | Path, error: type[UserError] = ConfigError) -> dict:
    """A YAML file whose top level is a mapping (an empty file is ``{}``), or ``error`` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"config file {p} does not exist")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise error(f"{p}: the top level must be a mapping, got {type(tree).__name__}")
    return tree


def parse_override(arg: str, error: type[UserError] = ConfigError) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 0.0001)``; the value is read as YAML (``""`` stays a string)."""
    if "=" not in arg:
        raise error(f"override {arg!r} must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = arg.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise error(f"override {arg!r}: the key must be a dotted path like optim.lr")
    if raw == "":
        return key, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, fix_floats(value)


def set_path(tree: dict, dotted: str, value: Any, error: type[UserError] = ConfigError) -> None:
    """Set ``tree[a][b][0][c] = value`` for ``dotted = "a.b.0.c"``; missing mappings are created."""
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise error(f"override {dotted!r}: {'.'.join(parts[:i]) or 'list'} has {len(node)} "
                            f"entries, {p!r} is not an index of it")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                if node.get(p) is None:
                    node[p] = {}
                node = node[p]
        else:
            raise error(f"override {dotted!r}: {'.'.join(parts[:i])} is a value ({node!r}), not a section")


def apply_overrides(tree: dict, overrides: typing.Iterable[str], error: type[UserError] = ConfigError) -> dict:
    """Apply ``key=value`` strings to a plain tree in order (later ones win); returns the tree."""
    for arg in overrides:
        key, value = parse_override(arg, error)
        set_path(tree, key, value, error)
    return tree


# ----------------------------------------------------------------------------- typed building

def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str, error: type[UserError] = ConfigError) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; ``error`` naming ``path`` if not."""
    if tp is Any or tp is object:
        return fix_floats(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise error(f"{path}: must not be null (expected {_name(tp)})")
        first = None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path, error)
            except UserError as e:
                first = first or e
        raise first
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise error(f"{path}: must be one of {list(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, path, error)
    base = origin or tp
    if base in (list, tuple, dict) and value is None:
        raise error(f"{path}: expected {_name(base)}, got null")
    if base is list:
        if not isinstance(value, list | tuple):
            raise error(f"{path}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(tp) or (Any,)
        return [coerce(v, item, f"{path}.{i}", error) for i, v in enumerate(value)]
    if base is tuple:
        if not isinstance(value, list | tuple):
            raise error(f"{path}: expected a list, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{path}.{i}", error) for i, v in enumerate(value))
        if len(value) != len(args):
            raise error(f"{path}: expected {len(args)} values, got {len(value)} ({list(value)!r})")
        return tuple(coerce(v, a, f"{path}.{i}", error) for i, (v, a) in enumerate(zip(value, args)))
    if base is dict:
        if not isinstance(value, dict):
            raise error(f"{path}: expected a mapping, got {value!r} ({type(value).__name__})")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {coerce(k, kt, f"{path} key", error): coerce(v, vt, f"{path}.{k}", error) for k, v in value.items()}
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, str):
            value = fix_floats(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    else:  # a type this module does not check: pass it on
        return value
    raise error(f"{path}: expected {_name(base)}, got {value!r} ({type(value).__name__})")


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a dataclass (init fields only)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_keys(cls: type, keys: typing.Iterable[str], path: str, error: type[UserError] = ConfigError,
               what: str = "key") -> None:
    """``error`` listing the valid keys when ``keys`` holds a name that is not a field of ``cls``.

    The message reads ``unknown <what>(s) [...] in '<path>'; valid keys: [...]``."""
    valid = list(field_types(cls))
    unknown = sorted(set(keys) - set(valid), key=str)
    if unknown:
        where = f"in {path!r}" if path else "at the top level"
        raise error(f"unknown {what}(s) {unknown} {where}; valid keys: {valid}")


def coerce_fields(cls: type, values: dict, path: str, error: type[UserError] = ConfigError,
                  what: str = "key") -> dict[str, Any]:
    """``values`` (a subset of ``cls``'s fields) checked for unknown keys and converted to the field types."""
    if not isinstance(values, dict):
        raise error(f"{path or 'config'}: expected a mapping, got {values!r} ({type(values).__name__})")
    check_keys(cls, values, path, error, what)
    types_ = field_types(cls)
    return {k: coerce(v, types_[k], f"{path}.{k}" if path else k, error) for k, v in values.items()}


def build(cls: type, tree: Any, path: str = "", error: type[UserError] = ConfigError, what: str = "key") -> Any:
    """An instance of the dataclass ``cls`` from a plain mapping (see the module docstring for the rules)."""
    kwargs = coerce_fields(cls, tree, path, error, what)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{path or 'config'}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except UserError as e:
        if isinstance(e, error):
            raise
        raise error(f"{path}: {e}" if path else str(e)) from e


def replace(obj: Any, changes: dict, path: str = "", error: type[UserError] = ConfigError, what: str = "key") -> Any:
    """``dataclasses.replace`` with the same key and type checks as :func:`build`."""
    try:
        return dataclasses.replace(obj, **coerce_fields(type(obj), changes, path, error, what))
    except UserError as e:
        if isinstance(e, error):
            raise
        raise error(f"{path}: {e}" if path else str(e)) from e


def load(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         error: type[UserError] = ConfigError) -> Any:
    """Read a YAML file (or start from nothing), apply ``key=value`` overrides, build ``cls``."""
    tree = read_yaml(path, error) if path is not None else {}
    return build(cls, apply_overrides(tree, overrides, error), "", error)


def import_object(spec: str, error: type[UserError] = ConfigError) -> Any:
    """``"package.module:name"`` (a config's builder, exporter, instrument) -> the object, or ``error``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise error(f"{spec!r} must be 'module:name'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise error(f"cannot import module {mod_name!r} (from {spec!r}): {e}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise error(f"module {mod_name!r} has no {attr!r} (from {spec!r})") from None


# ----------------------------------------------------------------------------- writing back

def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and paths -> dicts, lists and strings (what ``yaml.safe_dump`` and JSON take)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump(obj: Any) -> str:
    """A config tree as YAML that :func:`load` reads back to an equal tree."""
    return yaml.safe_dump(to_plain(obj), sort_keys=False)
