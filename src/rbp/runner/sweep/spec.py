"""What a sweep runs: the spec (YAML or flags) and its points, as ``key=value`` settings.

A point's values become settings overrides of one ordinary run: ``method: [a, b]`` is the
setting ``methods=[a, b]``, every other key ``key=VALUE`` (VALUE written back as YAML). A
``method`` value restricts every model the point trains: the experiment's other method-list
settings (those named ``*_methods``, e.g. ``rbp citation``'s ``fp_methods`` and
``injected_methods``) get the same methods, unless the spec gives them itself or chooses the
point's ``models`` (then it says what each point trains, as ``configs/sweeps/table1.yaml``). A key
spelled as a flag, ``--some-flag``, is the setting ``some_flag`` when the experiment has one,
else a flag passed to the run as it is (``true``: the bare flag; ``false``/``null``: left out).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rbp.runner.aggregate import name_part
from rbp.runner.config import ConfigError, load_yaml_file, parse_override

__all__ = ["Point", "SweepSpec", "check_spec", "expand_grid", "load_spec", "parse_grid_option",
           "point_name"]

_SPEC_KEYS = {"experiment", "grid", "points", "fixed", "out", "quick", "args", "workers",
              "backend", "address", "cpus_per_run", "imports"}


@dataclass
class SweepSpec:
    """What to run: ``experiment`` over the product of ``grid`` (times the explicit value sets
    in ``points``, for grids that are not a full product) with ``fixed`` settings."""

    experiment: str
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None
    quick: bool = False
    args: list[str] = field(default_factory=list)  # extra flags passed verbatim to every run
    workers: int = 1
    backend: str = "local"
    address: str | None = None
    cpus_per_run: float = 1.0
    imports: list[str] = field(default_factory=list)  # modules that register extra experiments

    @property
    def out_dir(self) -> Path:
        """The sweep directory (default ``runs/sweeps/<experiment>``)."""
        return Path(self.out) if self.out is not None else Path("runs/sweeps") / self.experiment


@dataclass
class Point:
    """One grid point: its ``values``, directory ``name``, the run's settings ``overrides``
    (``key=value`` texts) and the other ``flags`` passed to it verbatim."""

    name: str
    values: dict[str, Any]
    overrides: list[str]
    flags: list[str]

    @property
    def argv(self) -> list[str]:
        """The run's arguments after ``rbp <experiment>`` (without ``--out``)."""
        return [*self.flags, *(a for o in self.overrides for a in ("--set", o))]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_spec(path: Path) -> SweepSpec:
    """Read a sweep spec YAML file (keys: experiment, grid, points, fixed, out, quick, args,
    workers, backend, address, cpus_per_run, imports). A relative ``out`` is taken from the
    current directory, like ``--out`` of any run."""
    path = Path(path)
    data = load_yaml_file(path, "sweep spec") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {path} must be a mapping")
    unknown = sorted(set(data) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in sweep spec {path} "
                          f"(valid: {', '.join(sorted(_SPEC_KEYS))})")
    if "experiment" not in data:
        raise ConfigError(f"sweep spec {path} needs 'experiment:'")
    grid, fixed = data.get("grid") or {}, data.get("fixed") or {}
    extra, args = data.get("points") or [], data.get("args") or []
    imports = data.get("imports") or []
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise ConfigError(f"'grid:' and 'fixed:' in {path} must be mappings")
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise ConfigError(f"'points:' in {path} must be a list of mappings")
    if not isinstance(args, list) or not isinstance(imports, list):
        raise ConfigError(f"'args:' and 'imports:' in {path} must be lists")
    quick = data.get("quick", False)
    if not isinstance(quick, bool):  # bool("no") is True: take only YAML's true / false
        raise ConfigError(f"'quick:' in sweep spec {path} must be true or false, got {quick!r}")
    # each value of its own type, not converted: int(2.7) would silently run 2 workers
    kinds = {"experiment": (str,), "out": (str,), "backend": (str,), "address": (str,),
             "workers": (int,), "cpus_per_run": (int, float)}
    for key, types_ in kinds.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types_)):
            want = "a whole number" if key == "workers" else "a number" \
                if key == "cpus_per_run" else "text"
            raise ConfigError(f"'{key}:' in sweep spec {path} must be {want}, got {value!r}")
    spec = SweepSpec(
        experiment=data["experiment"],
        grid={str(k): _as_list(v) for k, v in grid.items()},
        points=[{str(k): v for k, v in e.items()} for e in extra],
        fixed={str(k): v for k, v in fixed.items()},
        out=Path(data["out"]) if data.get("out") is not None else None,
        quick=quick, args=[str(a) for a in args],
        workers=data.get("workers", 1), backend=data.get("backend", "local"),
        address=data.get("address"), cpus_per_run=float(data.get("cpus_per_run", 1.0)),
        imports=[str(m) for m in imports])
    check_spec(spec)
    return spec


def _repeated(items: list[Any]) -> list[str]:
    """The items that occur more than once, as JSON (equal values, not values that print
    alike: 0.1 and '0.1' differ)."""
    texts = [json.dumps(v, sort_keys=True, default=str) for v in items]
    return sorted({t for t in texts if texts.count(t) > 1})


def check_spec(spec: SweepSpec) -> None:
    """Raise :class:`ConfigError` for an empty grid axis, a value or point given twice, a key
    given twice or a bad backend."""
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"grid key '{key}' has no values")
        twice = _repeated(values)
        if twice:  # the same run twice: double the work, two directories of one result
            raise ConfigError(f"grid key '{key}' repeats the value(s) {', '.join(twice)}; "
                              "give each value once")
    twice = _repeated(spec.points)
    if twice:
        raise ConfigError(f"points repeat the entry/entries {', '.join(twice)}; give each once")
    point_keys = {k for e in spec.points for k in e}
    both = sorted((set(spec.grid) | point_keys) & set(spec.fixed))
    if both:
        raise ConfigError(f"key(s) {both} are both in the grid and fixed")
    both = sorted(set(spec.grid) & point_keys)
    if both:
        raise ConfigError(f"key(s) {both} are both in the grid and in points")
    quick = [spec.quick, *spec.grid.get("quick", []), *(e["quick"] for e in spec.points
                                                         if "quick" in e)]
    if "quick" in spec.fixed:
        quick.append(spec.fixed["quick"])
    bad = [q for q in quick if not isinstance(q, bool)]
    if bad:  # bool("no") is True: a string would turn --quick on
        raise ConfigError(f"'quick' must be true or false, got {bad[0]!r}")
    if spec.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {spec.workers}")
    if spec.cpus_per_run <= 0:
        raise ConfigError(f"cpus_per_run must be positive, got {spec.cpus_per_run}")
    if spec.backend not in ("local", "ray"):
        raise ConfigError(f"backend must be 'local' or 'ray', got '{spec.backend}'")


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``--grid key=a,b,c`` -> ``(key, [a, b, c])`` with each value parsed as YAML
    (``--grid lr=[0.1,0.01]`` is a YAML list as well)."""
    key, value = parse_override(text)
    if isinstance(value, list):
        return key, value
    raw = text.partition("=")[2]
    return key, [yaml.safe_load(p) for p in raw.split(",") if p.strip()]


def _yaml_scalar(value: Any) -> str:
    """``value`` written so that YAML reads it back unchanged (JSON is valid YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "," not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _translate(key: str, value: Any, settings: Collection[str] | None) -> tuple[list[str],
                                                                               list[str]]:
    """``(overrides, flags)`` of one spec entry."""
    if key.startswith("--"):
        name = key[2:].replace("-", "_")
        if settings is None or name not in settings:
            if value is True:
                return [], [key]
            return ([], []) if value is False or value is None else ([], [key, str(value)])
        key = name
    if key in ("method", "methods"):
        return ["methods=" + ",".join(str(v) for v in _as_list(value))], []
    if key == "quick":
        if not isinstance(value, bool):  # bool("no") is True: take only true / false
            raise ConfigError(f"'quick' must be true or false, got {value!r}")
        return [], ["--quick"] if value else []
    return [f"{key}={_yaml_scalar(value)}"], []


def point_name(values: Mapping[str, Any]) -> str:
    """Directory name of a grid point, e.g. ``method-rbp__seed-0``."""
    if not values:
        return "run"
    return "__".join(f"{name_part(k.lstrip('-'))}-{name_part(v)}" for k, v in values.items())


def expand_grid(spec: SweepSpec, settings: Collection[str] | None = None) -> list[Point]:
    """The points of ``spec``: the product of the grid values (last key varying fastest), each
    combined with every entry of ``spec.points`` (when there are any). ``settings``: the
    experiment's setting names, so that ``--data-dir`` becomes the setting ``data_dir``."""
    base_o: list[str] = []
    base_f: list[str] = ["--quick"] if spec.quick else []
    for key, value in spec.fixed.items():
        o, f = _translate(key, value, settings)
        base_o, base_f = base_o + o, base_f + f
    base_f += spec.args
    # a `method` value restricts every model of the point: the experiment's other method
    # lists (citation's fp_methods, injected_methods) follow it unless the spec sets them or
    # picks the point's models itself (table1.yaml)
    method_lists = sorted(k for k in settings or () if k.endswith("_methods"))
    keys = list(spec.grid)
    points: list[Point] = []
    seen: dict[str, int] = {}
    for combo, extra in itertools.product(itertools.product(*(spec.grid[k] for k in keys)),
                                          spec.points or [{}]):
        values = {**dict(zip(keys, combo, strict=True)), **extra}
        overrides, flags = list(base_o), list(base_f)
        for key, value in values.items():
            o, f = _translate(key, value, settings)
            overrides, flags = overrides + o, flags + f
        given = {k.lstrip("-").replace("-", "_") for k in [*spec.fixed, *values]}
        method = next((v for k, v in [*spec.fixed.items(), *values.items()]
                       if k.lstrip("-") in ("method", "methods")), None)
        if method is not None and "models" not in given:
            listed = ",".join(str(v) for v in _as_list(method))
            overrides += [f"{k}={listed}" for k in method_lists if k not in given]
        name = point_name(values)
        if name in seen:  # two values that print alike: keep both runs apart
            seen[name] += 1
            name = f"{name}__{seen[name]}"
        else:
            seen[name] = 0
        points.append(Point(name=name, values=values, overrides=overrides, flags=flags))
    return points
