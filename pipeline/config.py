"""Typed, frozen configuration from ``params.yaml`` sections.

Each stage declares its configuration as a frozen dataclass (a comment on
every default), and parses its section of ``params.yaml`` with
:func:`load_config`. This is where every configuration is validated: unknown keys,
values of the wrong type, numbers that are not finite, empty strings, and values
outside the bounds a field declares (``Annotated[int, AtLeast(1)]``, see
:mod:`ssd.bounds`) are a :class:`ConfigError` whose one-line message names the
key; the dataclasses' own ``__post_init__`` checks (rules across fields) become
one too. Command-line overrides (``key.sub=value``, the value parsed as YAML) are
applied before validation, so they get the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with a one-line message meant for the user."""


@dataclasses.dataclass(frozen=True)
class Reads:
    """Marks a config field that names a file or folder the stage reads (``Annotated[str, Reads()]``,
    or :data:`InputPath`). Under DVC such a path must be one of the stage's deps
    (:mod:`pipeline.dvc_inputs`), or DVC would not rerun the stage when it changes."""


#: A config field naming a file or folder the stage reads.
InputPath = Annotated[str, Reads()]


def load_params(path: str | Path) -> dict:
    """Read a params YAML file (UTF-8) into a dict (empty file: empty dict)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: line {e.line}: key {e.key!r} given twice (first on line {e.first})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    _check_acyclic(data, str(path), [])
    return data


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with a key given twice is refused: PyYAML keeps
    the last value silently, while DVC's parser refuses the file, so a direct run and `dvc repro`
    would read different settings. (A key that overrides one merged in with ``<<`` is fine.)"""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # a complex key: PyYAML refuses the unhashable ones itself
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_acyclic(node: Any, path: str, parents: list[int], key: str = "") -> None:
    """A YAML alias inside its own anchor builds a structure that contains itself: refuse it."""
    if not isinstance(node, (dict, list)):
        return
    if id(node) in parents:
        raise ConfigError(f"{path}: {key}: a YAML alias refers to itself (an anchor used inside its own value)")
    parents.append(id(node))
    for k, child in node.items() if isinstance(node, dict) else enumerate(node):
        _check_acyclic(child, path, parents, _join(key, str(k)))
    parents.pop()


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Return a copy of ``data`` with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking keys and types recursively.

    A ``ValueError`` from the dataclass's own checks becomes a :class:`ConfigError` naming where.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown key; valid keys are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    # A key the built config would not read (``ignored_keys()``: key -> why) is refused when given.
    for name, why in (obj.ignored_keys() if hasattr(obj, "ignored_keys") else {}).items():
        if name in data:
            raise ConfigError(f"{_join(where, name)}: {why}; remove it")
    return obj


def to_dict(cfg: Any) -> dict:
    """The plain-dict form of a config dataclass (tuples as lists), for saving with outputs."""
    return _plain(dataclasses.asdict(cfg))


def load_config(
    cls: type[T], params: Mapping[str, Any], section: str, overrides: Sequence[str] = (), source: str = "params"
) -> T:
    """Parse ``params[section]`` (after ``overrides``, given relative to the section) into ``cls``.

    A section missing from ``params``, or null (every line under it commented out), is an error,
    never a run with the defaults.
    """
    if section not in params:
        known = ", ".join(sections_of(cls, params)) or "none"
        raise ConfigError(f"{source}: no section {section!r} (sections this stage can run: {known})")
    if params[section] is None:
        raise ConfigError(f"{source}: {section}: null; give its keys ({{}} for the defaults)")
    data = apply_overrides(params[section], overrides)
    return from_dict(cls, data, section)


def check_name_follows_model(section: Mapping[str, Any] | None, overrides: Sequence[str]) -> None:
    """Refuse ``--set model=...`` without ``--set name=...`` when the section names its outputs:
    the other model's metrics and reports would overwrite those of the section's own model, under
    its name. (A section without ``name`` names them after the model file: nothing to check.)"""
    keys = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}
    if "model" in keys and "name" not in keys and (section or {}).get("name"):
        raise ConfigError(
            f"--set {keys['model']}: the results would be filed as {section['name']!r} (the name of the section's "
            "own model), over its files; add --set name=<name>, or name=null for the model file's stem"
        )


def sections_of(cls: type, params: Mapping[str, Any]) -> list[str]:
    """The top-level sections of ``params`` that are valid ``cls`` configs, in file order."""
    found = []
    for name, data in params.items():
        if not isinstance(data, Mapping):
            continue
        try:
            from_dict(cls, data, str(name))
        except ConfigError:
            continue
        found.append(str(name))
    return found


def choose_section(
    cls: type, params: Mapping[str, Any], section: str | None, stage: str, source: str = "params"
) -> str:
    """The section a stage runs: the one named, or, when none is named, the only ``cls`` section.

    A stage with several sections in the file (train, evaluate) must be told which one; a
    misspelt name is an error listing the stage's sections, never a run with the defaults.
    """
    if section is not None:
        return section
    known = sections_of(cls, params)
    if len(known) == 1:
        return known[0]
    listing = ", ".join(known) if known else "none"
    raise ConfigError(f"{source}: --section is required: {len(known)} {stage} sections ({listing})")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists and None become strings (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


#: A run name becomes a file and folder name in several output folders (a training run's
#: checkpoints/<name> is deleted when it finishes; an evaluation replaces reports/<name>): one
#: path component, nothing that climbs out of them.
_RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def check_run_name(name: str, key: str) -> None:
    """ValueError unless ``name`` is a safe single path component (letters, digits, ``_.+-``)."""
    if not _RUN_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{key} {name!r} is not a valid run name: use letters, digits and _ . + - "
            "(it names files and folders; no path separators, no '..')"
        )


#: A number in exponent notation without a decimal point (``1e-3``), which YAML 1.2 reads as a float.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _float(key: str, value: Any) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        # PyYAML (YAML 1.1) reads 1e-3 as a string; DVC's parser (YAML 1.2) as a number
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:  # a type with bounds (ssd.bounds): convert, then check each
        base, *bounds = get_args(tp)
        value = _convert(base, value, key)
        for bound in bounds:
            problem = bound.problem(value) if hasattr(bound, "problem") else None
            if problem:
                raise ConfigError(f"{key}: {problem}, got {_show(value)}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message (a bound, a list item) says more
            raise errors[0]
        raise ConfigError(f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):
            value = _yaml11_word(value, choices)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:  # `--set x=null` or a section whose lines are all commented out: say so
            raise ConfigError(f"{key}: null; give its keys ({{}} for the defaults)")
        return from_dict(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if origin is tuple and args and len(args) != 1:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp) or (Any, Any)
        return {_convert(args[0], k, key): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if abs(value) >= 2**63:  # torch and numpy take 64-bit integers: an OverflowError deep inside
            raise ConfigError(f"{key}: {value} is out of range (a 64-bit integer)")
        return value
    if tp is float:
        return _float(key, value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if not value.strip():
            raise ConfigError(f"{key}: must not be empty")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


#: What YAML 1.1 (PyYAML, and so `--set` and params.yaml) reads as a boolean: `no` is False.
_YAML11_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _yaml11_word(value: bool, choices: tuple) -> Any:
    """The string choice a YAML 1.1 boolean was written as (``mixed_precision: no`` is False to
    PyYAML but means the choice "no"); the value itself when no choice, or several, fit."""
    fits = [c for c in choices if isinstance(c, str) and c.lower() in _YAML11_WORDS[value]]
    return fits[0] if len(fits) == 1 else value


def _show(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Annotated:
        return _name(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (tuple, list):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _deepcopy(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
