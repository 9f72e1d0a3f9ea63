"""The one config system: typed dataclasses built from YAML mappings, with each field's range declared
next to it. Used by the run config (`locdiff.model.config`), the baselines' options
(`locdiff.baselines.options`) and the data-set and encoder configs (`locdiff.data.config`).

    @dataclass
    class TrainConfig:
        steps: int = setting(2000, ge=1)
        lr: float = setting(1e-3, gt=0)
        dropout: float = setting(0.1, ge=0, lt=1)
        device: str = setting("auto", pattern=DEVICE_PATTERN, expect=DEVICE_EXPECT)

    build(TrainConfig, {"steps": -5}, source="configs/model/base.yaml", prefix="train")
    # ConfigError: configs/model/base.yaml: train.steps: must be an integer >= 1; got -5

Annotations understood: bool, int, float (ints accepted; NaN and infinities refused), str, Literal[...],
X | None, list[X], dict[str, Any] (a free mapping, which a field's `check=` may validate) and nested
dataclasses. Nothing is coerced: "5" is not an integer, 5.0 is not an integer, "yes" is not a bool.
A key that is not a field is refused with the valid keys listed; a field without a default is required.
Rules between fields: a dataclass may define `validate(self) -> None` raising `Invalid(key, problem)`,
`key` relative to that dataclass (e.g. "min_train_timestep" or "predict.steps").

Why dataclasses rather than pydantic models: the callers rely on dataclass behaviour (`dataclasses.asdict`
to save configs and baseline options, `replace`, subclassing with new defaults as `FlowOptions(MLPOptions)`
does, plain construction in tests), pydantic's lax mode coerces "5" and 5.0 to 5 and strict mode needs
per-type exceptions for int-as-float, and its messages (one per union member, no list of valid keys) would
need rewriting into the `FILE: KEY: PROBLEM` form anyway. This module is that form, in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from locdiff.errors import ConfigError, UserError, one_line, reraise_for

T = TypeVar("T")

# torch device strings a config may name ("auto": cuda when available, else cpu)
DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu)(:\d+)?"
DEVICE_EXPECT = "auto, cpu, cuda, cuda:N or mps"
MAX_CONFIG_BYTES = 1 << 20  # a config file larger than this is refused unread


class Invalid(ValueError):
    """A value that fails its field's rule; `key` is relative to the object being built ("" = itself)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem)

    def under(self, prefix: str) -> Invalid:
        return Invalid(join_key(prefix, self.key), self.problem)


@dataclass(frozen=True)
class Spec:
    """A field's rule beyond its type. Number bounds apply to a number, or to each item of a list."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_len: int | None = None  # lists: at least this many items
    max_len: int | None = None  # lists: at most this many items
    pattern: str | None = None  # strings: must match in full (re.fullmatch)
    expect: str | None = None  # strings: what a matching value looks like, for the message
    check: Callable[[Any], Any] | None = None  # after the type check: returns the value or raises Invalid


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            min_len: int | None = None, pattern: str | None = None, expect: str | None = None,
            check: Callable[[Any], Any] | None = None, max_len: int | None = None) -> Any:
    """A dataclass field with its rule: `steps: int = setting(2000, ge=1)`.

    ge/gt/le/lt bound a number (or every item of a list of numbers); min_len and max_len bound a list's
    length; pattern (with `expect`, its description) constrains a string; check validates what the type
    allows (it gets the typed value and returns it, or raises Invalid with a key relative to the field).
    A subclass that only changes a default (`epochs: int = 40`) keeps the base class's rule.
    """
    spec = Spec(ge, gt, le, lt, min_len, max_len, pattern, expect, check)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"locdiff": spec})


def join_key(prefix: str, key: str) -> str:
    """`train` + `steps` -> `train.steps`; `widths` + `[1]` -> `widths[1]`."""
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def show(value: Any) -> str:
    """A value as the message shows it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return one_line(_short_repr(value, 100), 80)


def _short_repr(value: Any, budget: int) -> str:
    """repr(value), with lists and mappings cut after about `budget` characters: a YAML alias nests a list in
    itself many times over (a billion laughs) and its whole repr would never finish."""
    if not isinstance(value, list | tuple | dict):
        return repr(value)
    if budget <= 0:
        return "..."
    parts: list[str] = []
    used = 2
    for item in value.items() if isinstance(value, dict) else value:
        if used >= budget:
            parts.append("...")
            break
        if isinstance(value, dict):
            text = f"{_short_repr(item[0], budget - used)}: {_short_repr(item[1], budget - used)}"
        else:
            text = _short_repr(item, budget - used)
        parts.append(text)
        used += len(text) + 2
    body = ", ".join(parts) + ("," if isinstance(value, tuple) and len(value) == 1 else "")
    brackets = "{}" if isinstance(value, dict) else "()" if isinstance(value, tuple) else "[]"
    return brackets[0] + body + brackets[1]


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def range_text(spec: Spec | None) -> str:
    """'>= 1', '> 0', 'in [0, 1)', 'in [1, 512]', or '' without bounds."""
    if spec is None:
        return ""
    lo = (spec.ge, "[", ">=") if spec.ge is not None else (spec.gt, "(", ">") if spec.gt is not None else None
    hi = (spec.le, "]", "<=") if spec.le is not None else (spec.lt, ")", "<") if spec.lt is not None else None
    if lo and hi:
        return f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
    if lo:
        return f"{lo[2]} {_num(lo[0])}"
    if hi:
        return f"{hi[2]} {_num(hi[0])}"
    return ""


def _in_range(x: float, spec: Spec | None) -> bool:
    if spec is None:
        return True
    return not ((spec.ge is not None and x < spec.ge) or (spec.gt is not None and x <= spec.gt)
                or (spec.le is not None and x > spec.le) or (spec.lt is not None and x >= spec.lt))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def spec_of(cls: type, name: str) -> Spec | None:
    """The rule of field `name` of dataclass `cls` (looked up through its base classes)."""
    for klass in cls.__mro__:
        for f in dataclasses.fields(klass) if dataclasses.is_dataclass(klass) else ():
            if f.name == name and "locdiff" in f.metadata:
                return f.metadata["locdiff"]
    return None


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def expected(tp: Any, spec: Spec | None = None) -> str:
    """What a value of annotation `tp` under `spec` must be, in words: 'an integer >= 1'."""
    rng = range_text(spec)
    rng = f" {rng}" if rng else ""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(map(show, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        parts = [expected(a, spec) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        what = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item, "values")
        size = "a non-empty list" if spec is not None and spec.min_len == 1 else (
            f"a list of at least {spec.min_len} items" if spec is not None and spec.min_len else "a list")
        most = f" (at most {spec.max_len} items)" if spec is not None and spec.max_len else ""
        return f"{size} of {what}{rng}{most}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(field_names(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{rng}"
    if tp is float:
        return f"a number{rng}"
    if tp is str:
        return spec.expect if spec is not None and spec.expect else "a string"
    return _type_name(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, spec: Spec | None = None) -> Any:
    """`value` checked against annotation `tp` and `spec`; raises Invalid (key relative to the value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return coerce(value, options[0], spec)
            except Invalid as err:
                if err.key:  # an item or a nested key: its own message is more precise
                    raise
                raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}") from None
        for arg in options:
            try:
                return coerce(value, arg, spec)
            except Invalid:
                continue
        raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
    if origin is Literal:
        if not any(type(a) is type(value) and a == value for a in typing.get_args(tp)):
            raise Invalid("", f"must be {expected(tp)}; got {show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        if spec is not None and ((spec.min_len and len(value) < spec.min_len)
                                 or (spec.max_len is not None and len(value) > spec.max_len)):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        item_spec = dataclasses.replace(spec, min_len=None, max_len=None, check=None) if spec is not None else None
        out = []
        for i, v in enumerate(value):
            try:
                out.append(coerce(v, item, item_spec))
            except Invalid as err:
                raise err.under(f"[{i}]") from None
        return _checked(out, spec)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Invalid("", f"must be a mapping; got {show(value)}")
        return _checked(dict(value), spec)
    if dataclasses.is_dataclass(tp):
        return _checked(build_at(tp, value), spec)
    if tp is bool:
        if not isinstance(value, bool):
            raise Invalid("", f"must be true or false; got {show(value)}")
        return _checked(value, spec)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, spec):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        return _checked(value, spec)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}{_yaml_float_hint(value)}")
        if not math.isfinite(value):
            raise Invalid("", f"must be a finite number{' ' + range_text(spec) if range_text(spec) else ''}; "
                              f"got {show(value)}")
        if not _in_range(value, spec):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        return _checked(float(value), spec)
    if tp is str:
        if not isinstance(value, str):
            raise Invalid("", f"must be a string; got {show(value)}")
        if spec is not None and spec.pattern and not re.fullmatch(spec.pattern, value):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        return _checked(value, spec)
    raise TypeError(f"unsupported annotation {tp!r}")  # a bug in a config class, not bad input


def _yaml_float_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads 1e-3 as text: say how to write it as a number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):
        mantissa, exponent = value.strip().lower().split("e")
        return f" (YAML reads {value} as text; write {mantissa}.0e{exponent})"
    return ""


def _checked(value: Any, spec: Spec | None) -> Any:
    return spec.check(value) if spec is not None and spec.check is not None else value


def _unknown(key: Any, names: list[str]) -> Invalid:
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return Invalid(str(key), f"unknown key{hint}; valid keys here: {', '.join(names)}")


def build_at(cls: type[T], data: Any) -> T:
    """A `cls` from a mapping; raises Invalid with the key path relative to `data`."""
    names = field_names(cls)
    if not isinstance(data, dict):
        raise Invalid("", f"must be {expected(cls)}; got {show(data)}")
    for key in data:
        if key not in names:
            raise _unknown(key, names)
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise Invalid(f.name, f"missing; this key is required ({expected(hints[f.name])})")
            continue
        try:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], spec_of(cls, f.name))
        except Invalid as err:
            raise err.under(f.name) from None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def check_ranges(obj: Any, source: str) -> None:
    """The number bounds of a dataclass made directly (not through `build`), e.g. from CLI flags:
    ConfigError "SOURCE: FIELD: must be >= 1; got 0" for the first field out of its `setting` range."""
    for f in dataclasses.fields(obj):
        value, spec = getattr(obj, f.name), spec_of(type(obj), f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):  # NaN passes every comparison of _in_range
                raise ConfigError(source, f.name, "must be a finite number"
                                  f"{' ' + range_text(spec) if range_text(spec) else ''}; got {show(value)}")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not _in_range(v, spec):
                raise ConfigError(source, f.name, f"must be {range_text(spec)}; got {show(value)}")


def build(cls: type[T], data: Any, *, source: str = "", prefix: str = "") -> T:
    """A validated `cls` from a mapping, or ConfigError "SOURCE: PREFIX.KEY: PROBLEM".

    Args:
        cls: a dataclass whose fields may carry `setting(...)` rules.
        data: the mapping (e.g. parsed YAML); None is an empty mapping.
        source: where the mapping came from, e.g. the YAML file name ("" to leave it out).
        prefix: the key path of `data` inside its file, e.g. "baselines.knn".
    """
    try:
        return build_at(cls, {} if data is None else data)
    except Invalid as err:
        raise ConfigError(source, join_key(prefix, err.key), err.problem) from None


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.steps=500"` -> ("train.steps", 500): the value is read as YAML (scalars, [lists])."""
    if "=" not in item:
        raise ConfigError("--set", item, "expected KEY=VALUE, e.g. --set train.steps=500")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", item, "expected KEY=VALUE with a dotted key, e.g. train.steps=500")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or one_line(str(err), 120)
        raise ConfigError("--set", key, f"cannot read the value {raw[:40]!r} as YAML ({problem})") from None
    except RecursionError:
        raise ConfigError("--set", key, "cannot read the value as YAML (nested too deeply)") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise ConfigError("--set", key, f"cannot read the value as YAML ({one_line(str(err), 80)})") from None
    return key, value


def check_key_path(cls: type, key: str) -> None:
    """Refuse a dotted key that names no field of `cls` (checked down to the first free mapping)."""
    node: Any = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = field_names(node)
        if part not in names:
            raise ConfigError("--set", ".".join(parts[: i + 1]), _unknown(part, names).problem)
        tp = _hints(node)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError("--set", key, f"is a section; set one of its keys: {', '.join(field_names(tp))}")
            return
        if dataclasses.is_dataclass(tp):
            node = tp
        elif typing.get_origin(tp) is dict or tp is dict:
            return  # a free mapping: its keys are checked when the config is built
        else:
            raise ConfigError("--set", key, f"{'.'.join(parts[: i + 1])} is a value, not a section")


def apply_overrides(cls: type, data: dict[str, Any], overrides: Iterable[str] | None, *,
                    source: str = "") -> dict[str, Any]:
    """`data` (not modified) with `KEY=VALUE` strings applied; key paths are checked against `cls`. A
    section of `data` (from the file `source`) that an override enters must be a mapping there already:
    `train: [1, 2]` is refused, not replaced."""
    data = dict(data)
    for item in overrides or []:
        key, value = parse_override(item)
        check_key_path(cls, key)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(source, ".".join(parts[: i + 1]), f"must be a mapping; got {show(child)}")
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return data


def _types_at(tp: Any, value: Any, spec: Spec | None = None) -> None:
    """Raise Invalid (key relative to `value`) when `value` is not of annotation `tp`: types, list items and a
    section's keys only; number ranges, patterns, `check` and cross-field rules (`validate`) are left to `build`."""
    origin = typing.get_origin(tp)
    if tp is Any or (value is None and origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)):
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise Invalid("", f"must be a mapping; got {show(value)}")
        names, hints = field_names(tp), _hints(tp)
        for key, item in value.items():
            if key not in names:
                raise _unknown(key, names)
            try:
                _types_at(hints[key], item, spec_of(tp, key))
            except Invalid as err:
                raise err.under(key) from None
        return
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        failures = []
        for arg in options:
            try:
                _types_at(arg, value, spec)
                return
            except Invalid as err:
                failures.append(err)
        if len(options) == 1 and failures[0].key:
            raise failures[0]
        raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        for i, v in enumerate(value):
            try:
                _types_at(item, v, spec)
            except Invalid as err:
                raise err.under(f"[{i}]") from None
        return
    try:
        coerce(value, tp)  # a scalar, Literal or free mapping: its type, without the field's rule
    except Invalid:
        hint = _yaml_float_hint(value) if tp is float else ""
        raise Invalid("", f"must be {expected(tp, spec)}; got {show(value)}{hint}") from None


def check_types(cls: type, data: Any, *, source: str) -> None:
    """The types of a mapping read from `source` (a config file) against `cls`, before any override is
    applied: ConfigError "SOURCE: KEY: must be ...; got ..." for the first value of the wrong type or unknown
    key, even one that a `--set` would replace. Ranges and cross-field rules are checked by `build`."""
    try:
        _types_at(cls, {} if data is None else data)
    except Invalid as err:
        raise ConfigError(source, err.key, err.problem) from None


def load(cls: type[T], data: dict[str, Any] | None, *, source: str,
         overrides: Iterable[str] | None = None) -> T:
    """`build` after `apply_overrides`; an error in a value that an override set names the override. With
    overrides, the file's own values are type-checked first (`check_types`): an override does not hide a
    wrongly typed value in the file."""
    overrides = list(overrides or [])
    if overrides:
        check_types(cls, data, source=source)
    merged = apply_overrides(cls, data or {}, overrides, source=source)
    try:
        return build(cls, merged, source=source)
    except ConfigError as err:
        keys = [parse_override(o)[0] for o in overrides]
        if any(err.key == k or err.key.startswith((k + ".", k + "[")) for k in keys):
            raise ConfigError("--set", err.key, err.problem) from None
        raise


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last one silently), and a value
    Python cannot convert (an int of more digits than it reads, a month 13) as an Invalid naming its key path."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except Invalid:  # a value below this one, already named
            raise
        except ValueError as err:
            line = node.start_mark.line + 1
            problem = (f"an integer of {len(node.value.lstrip('+-'))} digits (line {line}), more than Python reads"
                       if node.tag == "tag:yaml.org,2002:int" else f"{one_line(str(err), 80)} (line {line})")
            raise Invalid(getattr(node, "key_path", ""), f"{problem}; fix the file") from None

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        for i, child in enumerate(node.value):  # each node learns its key path (e.g. network.widths[1])
            child.key_path = join_key(getattr(node, "key_path", ""), f"[{i}]")
        return super().construct_sequence(node, deep=deep)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            value_node.key_path = join_key(getattr(node, "key_path", ""), one_line(str(key), 80))
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"the key {show(key)} is given twice",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike[str], *, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for an empty one); UserError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a YAML file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file; check the path")
    if not path.is_file():  # a FIFO would block the read, a device never end it
        raise UserError(f"{path}: not a regular file; give a YAML file")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise UserError(f"{path}: larger than {max_bytes} bytes; a config file is a few kB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
    try:
        loader = UniqueKeyLoader(text)  # what yaml.safe_load does, with duplicate keys refused
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or one_line(str(err), 200)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML ({problem}{where}); fix the file") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply); fix the file") from None
    except Invalid as err:  # a value Python cannot convert, named by its key (UniqueKeyLoader.construct_object)
        raise ConfigError(str(path), err.key, err.problem) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", f"the top level must be a mapping of keys; got {show(data)}")
    return data


def dump_yaml(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a mapping as YAML, atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = yaml.safe_dump(data, sort_keys=False)
    try:
        with reraise_for(tmp, what="config", writing=True):
            tmp.write_text(text)
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = [
    "DEVICE_EXPECT", "DEVICE_PATTERN", "Invalid", "Spec", "UniqueKeyLoader", "apply_overrides", "build", "build_at",
    "check_key_path", "check_types", "coerce", "dump_yaml", "expected", "join_key", "load", "parse_override",
    "range_text", "read_yaml", "setting", "show", "spec_of",
]
