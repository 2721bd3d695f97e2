"""Typed experiment settings: a dataclass filled from layered YAML and ``KEY=VALUE`` overrides.

Layers, lowest priority first: the experiment's default YAML (the paper's settings), its
``quick:`` section when ``quick=True``, the user's ``--config`` file (and its own ``quick:``
section), the environment variable ``RBP_DATA_DIR`` (setting ``data_dir`` only), ``--set
KEY=VALUE`` / ``KEY=VALUE`` overrides, then already-typed values from command-line flags
(``--data-dir``, ``--seed``, ...). Every key and type is checked in every layer (also a
``quick:`` section that is not used), floats must be finite, seeds must lie in
``0 .. 2**32 - 1``, ``methods`` and ``seeds`` must be non-empty lists without repeats,
``checkpoint_every`` must be >= 0 and ``interrupt_after`` >= 1, and the dataclass's
``validate()`` runs, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

__all__ = [
    "DATA_DIR_ENV",
    "QUICK_KEY",
    "ConfigError",
    "build_config",
    "check_methods",
    "config_fields",
    "config_to_dict",
    "default_config_path",
    "load_config",
    "load_yaml_file",
    "parse_override",
]

T = TypeVar("T")

#: Top-level YAML key whose mapping is applied only in ``--quick`` mode.
QUICK_KEY = "quick"

#: Environment variable giving the setting ``data_dir`` (below ``--set`` and ``--data-dir``).
DATA_DIR_ENV = "RBP_DATA_DIR"

#: Largest seed accepted (NumPy's global generator takes 32-bit seeds).
MAX_SEED = 2**32 - 1

#: List settings that must be non-empty and hold no repeats.
_UNIQUE_LISTS = ("methods", "seeds")

#: The runner's step-count settings and their smallest value.
_CONTROL_MINIMUM = {"checkpoint_every": 0, "interrupt_after": 1}

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A setting is unknown, has the wrong type or an impossible value."""


def default_config_path(name: str) -> Path:
    """Path of the packaged default settings ``rbp/configs/<name>.yaml``."""
    return _CONFIG_DIR / f"{name}.yaml"


def config_fields(cls: type) -> dict[str, Any]:
    """Map each settable field name of dataclass ``cls`` to its resolved type hint."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict copy of a settings dataclass instance."""
    return dataclasses.asdict(cfg)


def type_name(tp: Any) -> str:
    """Readable name of a type hint, e.g. ``list[int]`` or ``int | None``."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _fail() -> tuple[bool, Any]:
    return False, None


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against hint ``tp``; return ``(ok, value converted to the hint)``.

    ints are accepted (and converted) for floats, numeric strings such as ``"1e-3"`` (which
    YAML 1.1 reads as text) for floats, and strings for :class:`Path`; bools are never
    accepted as numbers. Unknown hint kinds are accepted unchecked.
    """
    if tp is Any or tp is object:
        return True, value
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        for arg in get_args(tp):
            ok, out = coerce(value, arg)
            if ok:
                return True, out
        return _fail()
    if tp is None or tp is type(None):
        return value is None, None
    if origin is Literal:
        for choice in get_args(tp):
            if value == choice and type(value) is type(choice):
                return True, value
        return _fail()
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _fail()
        args = get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(args) != len(value):
                return _fail()
            elem_types: Iterable[Any] = args
        else:
            elem_types = [args[0] if args else Any] * len(value)
        items = []
        for item, elem_tp in zip(value, elem_types, strict=True):
            ok, out = coerce(item, elem_tp)
            if not ok:
                return _fail()
            items.append(out)
        container = origin or tp
        return True, container(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return _fail()
        key_tp, val_tp = get_args(tp) or (Any, Any)
        out_map = {}
        for k, v in value.items():
            ok_k, ck = coerce(k, key_tp)
            ok_v, cv = coerce(v, val_tp)
            if not (ok_k and ok_v):
                return _fail()
            out_map[ck] = cv
        return True, out_map
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return _fail()
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return _fail()
        return _fail()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return True, Path(value)
        return _fail()
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def _unknown_key(key: str, valid: Iterable[str], source: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown setting '{key}' in {source}{hint} (valid settings: {', '.join(valid)})"
    )


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``KEY=VALUE`` and parse VALUE as YAML (``3`` -> int, ``[1, 2]`` -> list...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"a setting is KEY=VALUE (on its own or after --set), got '{text}'; "
                          "a list is one value, as in dataset=[cora,pubmed]")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None  # noqa: S506
    except _DuplicateKeyError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value '{raw}' as YAML "
                          f"({_yaml_problem(exc)}); quote it or fix its brackets") from None
    return key, value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line 2, column 1: expected ',' or ']' (while parsing a
    flow sequence)`` (PyYAML's own text spans several lines and names no file)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return where + problem + (f" ({context})" if context else "")


def _is_list_type(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return any(_is_list_type(a) for a in get_args(tp))
    return origin is list or tp is list


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key given twice (PyYAML silently
    keeps the last)."""


class _DuplicateKeyError(Exception):
    pass


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode,
                              deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # the mapping's own keys (a '<<' merge may be overridden)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML says so below
            continue
        line = key_node.start_mark.line + 1
        if first is not None:
            raise _DuplicateKeyError(f"key '{key}' is given twice (lines {first} and {line}); "
                                     "keep one")
        seen[key] = line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_unique_mapping)


def load_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in ``path`` (``what`` names it in errors: "config file", "sweep
    spec"), refusing a key given twice in a mapping and naming the file when it cannot be read
    as UTF-8 text or parsed. Raises :class:`ConfigError` or FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not a UTF-8 text file (byte {exc.start}: "
                          f"{exc.reason}); give a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {what} {path}: {_yaml_problem(exc)}; fix the YAML "
                          "there") from None


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    data = load_yaml_file(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{what} {path} must hold a mapping of settings, got {kind}")
    return data


def _split_quick(data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    data = dict(data)
    quick = data.pop(QUICK_KEY, None)
    if quick is None:  # absent, or `quick:` with nothing under it
        return data, {}
    if not isinstance(quick, dict):  # also [] or false: not silently an empty section
        raise ConfigError(f"'{QUICK_KEY}:' in {source} must be a mapping of settings, got "
                          f"{quick!r} ({type(quick).__name__}); indent the settings under it "
                          "or remove it")
    return data, quick


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    return False


def _seeds_in(key: str, value: Any) -> list[Any]:
    if key.startswith("num_") or not (key == "seed" or key.endswith(("_seed", "seeds"))):
        return []
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _seeds_in("seeds", v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _seeds_in("seed", v)]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else []


def _check_control(key: str, value: Any, source: str) -> None:
    """The runner's own settings: ``checkpoint_every`` (0: never) and ``interrupt_after``
    (a count of steps, or null); a negative value would silently mean "never" / "at once"."""
    if not isinstance(value, int) or isinstance(value, bool):
        return
    low = _CONTROL_MINIMUM.get(key)
    if low is not None and value < low:
        meaning = "0 saves no checkpoints" if low == 0 else "null: never"
        raise ConfigError(f"setting '{key}' in {source} must be >= {low}, got {value} "
                          f"({meaning})")


def _check_value(key: str, value: Any, source: str) -> None:
    """Checks that hold for every experiment: finite floats, 32-bit seeds, unique lists,
    the runner's step counts."""
    if _non_finite(value):
        raise ConfigError(f"setting '{key}' in {source} must be finite, got {value!r}")
    _check_control(key, value, source)
    for seed in _seeds_in(key, value):
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"setting '{key}' in {source}: seed {seed} is outside "
                              f"0..{MAX_SEED}; choose a seed in that range")
    if key in _UNIQUE_LISTS and isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"setting '{key}' in {source} is empty; name at least one")
        repeated = sorted({str(v) for v in value if list(value).count(v) > 1})
        if repeated:
            raise ConfigError(f"setting '{key}' in {source} repeats {', '.join(repeated)}; "
                              "list each once")


def _checked_layer(data: Mapping[str, Any], hints: Mapping[str, Any],
                   source: str) -> dict[str, Any]:
    """``data``'s settings converted to their hints; ConfigError naming ``source`` for an
    unknown key, a wrong type or an impossible value."""
    out = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(str(key), hints, source)
        ok, converted = coerce(value, hints[key])
        if not ok:
            raise ConfigError(
                f"setting '{key}' in {source} expects {type_name(hints[key])}, "
                f"got {value!r} ({type(value).__name__})"
            )
        _check_value(key, converted, source)
        out[key] = converted
    return out


def load_config(
    cls: type[T],
    default_yaml: Path | None,
    config_file: Path | None = None,
    overrides: Iterable[str] = (),
    quick: bool = False,
    values: Mapping[str, Any] | None = None,
    env: Mapping[str, Any] | None = None,
) -> T:
    """Build and validate a ``cls`` instance from the layered settings sources.

    ``default_yaml=None`` starts from the dataclass defaults alone. ``env`` holds settings
    from environment variables (above the files, below ``overrides``). ``values`` holds typed
    values from command-line flags and takes precedence over everything else. A ``cls`` with a
    static ``settle_layers(merged, layer_of)`` (``layer_of``: the rank of the layer each value
    came from, higher = later) may adjust the merged settings before they are built. Raises
    :class:`ConfigError` (unknown key, wrong type, impossible value) or FileNotFoundError.
    """
    hints = config_fields(cls)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    for path, what in ((default_yaml, "default config"), (config_file, "config file")):
        if path is None:
            continue
        data, quick_data = _split_quick(_read_yaml(path, what), f"{what} {path}")
        layers.append((f"{what} {path}", data))
        quick_source = f"'{QUICK_KEY}:' section of {what} {path}"
        if quick:
            layers.append((quick_source, quick_data))
        else:  # still checked, so a typo there is not found only on the first --quick run
            _checked_layer(quick_data, hints, quick_source)
    if env:
        layers.append(("the environment", dict(env)))
    set_values: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in hints and _is_list_type(hints[key]) and isinstance(value, (str, int, float)):
            # ``--set methods=rbp,cg`` or ``--set sizes=4``: a comma-separated list.
            raw = text.partition("=")[2]
            value = [yaml.safe_load(p) for p in raw.split(",") if p.strip()]
        set_values[key] = value
    layers.append(("--set", set_values))
    layers.append(("command-line flags", dict(values or {})))

    merged: dict[str, Any] = {}
    layer_of: dict[str, int] = {}  # the layer each merged value came from
    for rank, (source, data) in enumerate(layers):
        for key, converted in _checked_layer(data, hints, source).items():
            merged[key] = converted
            layer_of[key] = rank
    settle = getattr(cls, "settle_layers", None)
    if callable(settle):  # e.g. per-dataset defaults that a setting given later must beat
        merged = settle(merged, layer_of)

    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and no_default and f.name not in merged:
            raise ConfigError(f"setting '{f.name}' is required but was not given")
    cfg = cls(**merged)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def check_methods(names: Iterable[str], valid: Iterable[str], source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` for a method not in ``valid``."""
    valid = list(valid)
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown method '{name}' in {source}{hint} (valid: {', '.join(valid)}, all)"
            )


def parse_methods(text: str, valid: Iterable[str], source: str = "--method") -> list[str] | None:
    """``"rbp,cg"`` -> ``["rbp", "cg"]``; ``"all"`` -> every valid method (None: none known)."""
    valid = list(valid)
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError(f"{source} needs at least one method name or 'all'")
    if "all" in names:
        if len(names) > 1:
            check_methods([n for n in names if n != "all"], valid, source)
        return valid or None
    if valid:
        check_methods(names, valid, source)
    return names


def build_config(
    exp: Any,
    overrides: Iterable[str] = (),
    *,
    config_file: Path | None = None,
    quick: bool = False,
    values: Mapping[str, Any] | None = None,
) -> Any:
    """Settings of experiment ``exp`` (anything with ``name``, ``config_cls``, ``methods``,
    ``default_config``) from its default YAML, ``config_file``, ``$RBP_DATA_DIR`` and
    ``KEY=VALUE`` overrides, as runs and sweep points build them.

    ``methods=all`` expands to ``exp.methods``; every method name is checked against them.
    """
    methods: tuple[str, ...] = tuple(getattr(exp, "methods", ()) or ())
    texts = []
    for text in overrides:
        key, _, raw = text.partition("=")
        if key.strip() == "methods" and "all" in [p.strip() for p in raw.split(",")]:
            expanded = parse_methods(raw, methods, "setting 'methods'")
            if expanded is not None:
                text = "methods=" + ",".join(expanded)
        texts.append(text)
    default = getattr(exp, "default_config", None)
    if default is None:  # the packaged YAML; an experiment without one uses its defaults
        default = default_config_path(exp.name)
        default = default if default.is_file() else None
    env: dict[str, Any] = {}
    if os.environ.get(DATA_DIR_ENV) and "data_dir" in config_fields(exp.config_cls):
        env["data_dir"] = os.environ[DATA_DIR_ENV]
    cfg = load_config(exp.config_cls, default, config_file, texts, quick, values, env)
    methods_now = getattr(cfg, "methods", None)
    if methods and isinstance(methods_now, list):
        check_methods(methods_now, methods, "setting 'methods'")
    return cfg
