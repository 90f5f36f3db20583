"""The file and command-line layer of the run configuration: read JSON/YAML, apply `--set` overrides, build
typed dataclasses from mappings with an error naming the key (and the closest valid one) for any mistake, and
the self-documenting field (`setting`) every section declares its keys with.

engine/config/sections.py declares the sections, engine/config/schema.py checks them; nothing here knows a
section.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union



class ConfigError(ValueError):
    """A user error in the run configuration (unknown key, wrong type, impossible value)."""


def closest(key: str, valid) -> str:
    """"; did you mean 'x'?" for the valid name nearest to `key` ("" when there is none)."""
    match = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


_closest = closest


# ---- self-documenting settings ------------------------------------------------------------------------------

Options = Union[Tuple[Any, ...], Callable[[], Any]]  # values, or a zero-arg function returning them (lazy import)


def setting(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None, doc: str,
            choices: Optional[Options] = None, values: Optional[Options] = None) -> Any:
    """A config field that documents itself: `dataclasses.field` with its one-line `doc` and, for an
    enumeration, its `choices` (the one list the value is checked against: `check_choices`), in the field's
    metadata.

    Args:
        default / factory: the default value, or a zero-arg factory for a mutable one.
        doc: one line: what the key does (and what its special values mean).
        choices: the accepted values of an enumerated key. A zero-arg callable where the list lives in a package
            whose import is heavy (heads/, dali_pipes/, backbones/), so importing engine.config stays cheap.
        values: for a key that is not enumerated but whose value changes the code path (a sampled head, a
            margin, checkpointing), the representative values a configuration matrix draws; None among them
            means "left unset". Enumerated keys draw their choices. Also a zero-arg callable when lazy.
    """
    meta = {"doc": doc}
    if choices is not None:
        meta["choices"] = choices
    if values is not None:
        meta["values"] = values
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _resolve(options: Optional[Options]) -> Tuple[Any, ...]:
    if options is None:
        return ()
    return tuple(options() if callable(options) else options)


@dataclasses.dataclass(frozen=True)
class Documented:
    """One documented key: its dotted path, one-line doc, accepted choices (enumerations) and the values a
    configuration matrix draws (`draws`: `values` when declared, else the choices; None = left unset)."""

    key: str
    doc: str
    choices: Tuple[Any, ...] = ()
    values: Tuple[Any, ...] = ()

    @property
    def draws(self) -> Tuple[Any, ...]:
        return self.values or self.choices


def documented(cls, prefix: str) -> Iterator[Documented]:
    """Every field of dataclass `cls` (recursively through nested sections) as a `Documented`, keyed
    `prefix.field`; choices and values resolved (importing where they live)."""
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from documented(hints[f.name], key)
            continue
        if "doc" not in f.metadata:
            raise AssertionError(f"{key}: declared without setting(doc=...)")
        yield Documented(key, f.metadata["doc"], _resolve(f.metadata.get("choices")),
                         _resolve(f.metadata.get("values")))


def check_choices(section: Any, where: str) -> None:
    """The one check of every enumerated key of `section` (a dataclass instance, nested sections included)
    against its declared choices.

    Raises:
        ConfigError: ``<where>.<key>: expected one of [...], got <value>``.
    """
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{where}.{f.name}")
            continue
        if "choices" not in f.metadata:
            continue
        options = _resolve(f.metadata["choices"])
        if value not in options:
            hint = _closest(value, [str(o) for o in options]) if isinstance(value, str) else ""
            raise ConfigError(f"{where}.{f.name}: expected one of {sorted(options, key=str)}, got {value!r}{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        errors = []
        for alt in args:
            if alt is type(None):
                if value is None:
                    return None
                continue
            try:
                return coerce(value, alt, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own message ("expected an integer, got 'ten'")
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise AssertionError(f"unhandled annotation {tp} at {where}")


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> Dict[str, Any]:
    """typing.get_type_hints(cls), once per class (it re-evaluates every annotation string on each call)."""
    return typing.get_type_hints(cls)


def build_dataclass(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = _type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{where}.{key}'{_closest(key, names)} "
                              f"(valid keys of {where}: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """`--set` values parse as JSON when they can (numbers, booleans, lists, null), else stay strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; intermediate mappings are created as needed."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        path, text = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key path")
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is a value, not a section")
            node = nxt
        node[keys[-1]] = parse_value(text)
    return data


def read_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a JSON or YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
