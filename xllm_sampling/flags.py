"""Runtime flags: one switch per optimization, read on every call, no restart needed.

Each flag is defined in ``flags/flags.toml``. Its value comes from, lowest precedence first:

1. the definition's default;
2. the environment: ``XLLM_SAMPLING_<NAME>`` or one of the definition's aliases
   (for example ``XLLM_USE_AIR_TOPK``);
3. the flags file named by ``XLLM_SAMPLING_FLAGS_FILE`` (TOML, ``name = value``), re-read
   whenever it changes;
4. code: :func:`set` and the :func:`override` context manager (process-wide).

Unknown names and unparsable values raise ``ValueError`` naming the flag and what it accepts.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .paths import FLAGS_FILE

ENV_PREFIX = "XLLM_SAMPLING_"
FLAGS_FILE_ENV = "XLLM_SAMPLING_FLAGS_FILE"
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


@dataclass(frozen=True)
class FlagDef:
    """One flag: its name, type, default, step, environment variables and help line."""

    name: str
    type: str
    default: Any
    step: str
    aliases: tuple[str, ...]
    help: str
    min: int | None = None  # int flags: the smallest value accepted

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @functools.cached_property
    def env_vars(self) -> tuple[str, ...]:
        """The environment variables that set it, first match wins."""
        return (self.env, *self.aliases)

    def accepted(self) -> str:
        if self.type == "int":
            return "an integer" + (f" >= {self.min}" if self.min is not None else "")
        return {"bool": "true/false/1/0/on/off/yes/no", "str": "any string"}[self.type]


def _load_definitions() -> dict[str, FlagDef]:
    with open(FLAGS_FILE, "rb") as fh:
        raw = tomllib.load(fh)
    defs = {}
    for name, d in raw.items():
        defs[name] = FlagDef(name, d["type"], d["default"], d["step"], tuple(d.get("aliases", ())), d["help"],
                             d.get("min"))
    return defs


DEFINITIONS: dict[str, FlagDef] = _load_definitions()
_PATH_FLAGS = tuple(d.name for d in DEFINITIONS.values() if d.type == "bool" and d.step not in ("cuda_graph", "nvtx"))
_code_values: dict[str, Any] = {}
_MISSING = object()
_lock = threading.Lock()
_file_cache: tuple[tuple, dict[str, Any]] | None = None


def definition(name: str) -> FlagDef:
    """The definition of flag ``name``; ``ValueError`` listing the known flags if there is none."""
    try:
        return DEFINITIONS[name]
    except KeyError:
        raise ValueError(f"unknown flag {name!r}; known flags: {', '.join(DEFINITIONS)}") from None


def parse(name: str, value: Any) -> Any:
    """Convert ``value`` (a string or a Python value) to flag ``name``'s type, or raise ``ValueError``."""
    d = definition(name)
    if d.type == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    elif d.type == "int":
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = int(value.strip())
        if number is not None and (d.min is None or number >= d.min):
            return number
    else:
        return str(value)
    raise ValueError(f"flag {name!r}: cannot parse {value!r}; accepted values: {d.accepted()}")


def read_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flags file (``name = value`` TOML), checking every name and value; a problem is a
    ``ValueError`` naming the file."""
    values, problems = read_file_lenient(path)
    if problems:
        raise ValueError(f"flags file {path}: {problems[0]}")
    return values


def read_file_lenient(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read a flags file, keeping the entries that parse: (values, problems). A file that is not
    TOML gives no values and one problem. The repair commands use this, so that a broken file
    never blocks ``flags set`` or ``rollback --mode flag``."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        return {}, [f"not valid TOML ({e})"]
    values, problems = {}, []
    for name, value in raw.items():
        try:
            values[name] = parse(name, value)
        except ValueError as e:
            problems.append(str(e))
    return values, problems


def set_in_file(path: str | os.PathLike, name: str, value: Any) -> list[str]:
    """Set flag ``name`` in a flags file (made if absent), keeping its other entries that parse;
    returns the problems of the entries dropped, so that a broken file never blocks a repair."""
    value = parse(name, value)
    values, problems = read_file_lenient(path) if os.path.exists(path) else ({}, [])
    values[name] = value
    write_file(path, values)
    return problems


def write_file(path: str | os.PathLike, values: dict[str, Any]) -> None:
    """Write ``values`` as a flags file, replacing it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# xllm-sampling flags file: name = value (see `xllm-port flags list`)"]
    for name, value in sorted(values.items()):
        value = parse(name, value)
        text = str(value).lower() if isinstance(value, bool) else (str(value) if isinstance(value, int) else f'"{value}"')
        lines.append(f"{name} = {text}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _environ_data() -> dict | None:
    """``os.environ``'s own dict of encoded keys and values, where CPython keeps one (else None)."""
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) and hasattr(os.environ, "encodekey") else None


def _environ_get(var: str) -> str | None:
    """``os.environ.get(var)`` in a fraction of its cost (a flag is read on every op call): one
    lookup in the mapping's own dict under its encoded key, where CPython keeps one."""
    data = _environ_data()
    if data is None:
        return os.environ.get(var)
    key = _encoded_keys.get(var)
    if key is None:
        key = _encoded_keys[var] = os.environ.encodekey(var)
    raw = data.get(key)
    return None if raw is None else os.environ.decodevalue(raw)


_encoded_keys: dict[str, Any] = {}


def _file_values() -> dict[str, Any]:
    """The flags file's values, re-read when it changes. A broken file never breaks an op: the
    last good values stay in force, with one warning naming the file and the problem."""
    global _file_cache
    path = _environ_get(FLAGS_FILE_ENV)
    if not path:
        return {}
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return {}
    key = (path, stat.st_mtime_ns, stat.st_size)
    if _file_cache is None or _file_cache[0] != key:
        last_good = _file_cache[1] if _file_cache is not None and _file_cache[0][0] == path else {}
        try:
            values = read_file(path)
        except (ValueError, OSError) as e:
            warnings.warn(f"xllm_sampling: {e}; keeping the last good flag values until it is fixed", stacklevel=3)
            values = last_good
        _file_cache = (key, values)
    return _file_cache[1]


def _env_value(d: FlagDef, data: dict | None) -> tuple[str, str] | None:
    """(variable, text) of the first of ``d``'s environment variables that is set, or None: one
    lookup per variable in ``data`` (:func:`_environ_data`) under its encoded key (made once per
    flag), or the portable way where ``data`` is None."""
    if data is None:
        return next(((var, os.environ[var]) for var in d.env_vars if var in os.environ), None)
    keys = _env_keys.get(d.name)
    if keys is None:
        keys = _env_keys[d.name] = tuple((var, os.environ.encodekey(var)) for var in d.env_vars)
    for var, key in keys:
        raw = data.get(key)
        if raw is not None:
            return var, os.environ.decodevalue(raw)
    return None


_env_keys: dict[str, tuple] = {}  # flag -> ((variable, its encoded key in os.environ's dict), ...)
_parsed_env: dict[tuple[str, str], Any] = {}  # (flag, text) -> value: parsed once


def lookup(name: str) -> tuple[Any, str]:
    """The value of flag ``name`` and where it came from: ``code``, ``file``, ``env:VAR`` or
    ``default``. Every source is consulted on every call (each cheaply: the code values and the
    environment by one dict lookup, the flags file by one ``stat``), so a change applies to the next call."""
    return _lookup(definition(name), _file_values(), _environ_data())


def _lookup(d: FlagDef, file_values: dict[str, Any], environ: dict | None) -> tuple[Any, str]:
    """:func:`lookup` of ``d`` with the flags file's values and :func:`_environ_data` already read."""
    name = d.name
    if name in _code_values:
        return _code_values[name], "code"
    if name in file_values:
        return file_values[name], "file"
    env = _env_value(d, environ)
    if env is not None:
        key = (name, env[1])
        if key not in _parsed_env:
            _parsed_env[key] = parse(name, env[1])
        return _parsed_env[key], f"env:{env[0]}"
    return d.default, "default"


def get(name: str) -> Any:
    """The current value of flag ``name``; read on every call, so a change applies to the next call."""
    return lookup(name)[0]


def enabled(name: str) -> bool:
    """``get(name)`` for a bool flag."""
    return bool(get(name))


def set(name: str, value: Any) -> None:  # noqa: A001 - the spec names it flags.set
    """Set flag ``name`` from code (highest precedence) for the whole process."""
    value = parse(name, value)
    with _lock:
        _code_values[name] = value


def unset(name: str) -> None:
    """Drop a value set from code, so the file, environment or default applies again."""
    definition(name)
    with _lock:
        _code_values.pop(name, None)


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set flags from code inside a ``with`` block and restore the previous code values after it."""
    parsed = {name: parse(name, value) for name, value in values.items()}
    with _lock:
        saved = {name: _code_values.get(name, _MISSING) for name in parsed}
        _code_values.update(parsed)
    try:
        yield
    finally:
        with _lock:
            for name, old in saved.items():
                if old is _MISSING:
                    _code_values.pop(name, None)
                else:
                    _code_values[name] = old



def path_flags() -> tuple[str, ...]:
    """The flags that choose which code an op runs (every step's on/off switch but ``cuda_graph``
    itself and ``nvtx``, whose ranges are host-side): a captured CUDA graph holds the path these
    chose when it was captured."""
    return _PATH_FLAGS


def values(names: Iterable[str]) -> tuple:
    """The current values of the flags ``names``, read as :func:`get` reads each (a change applies
    at once), the flags file once for all of them."""
    file_values, environ = _file_values(), _environ_data()
    return tuple([_lookup(DEFINITIONS[name], file_values, environ)[0] for name in names])  # a list: cheaper than a generator


def path_state() -> tuple:
    """The current values of :func:`path_flags` (see :func:`values`)."""
    return values(_PATH_FLAGS)


def snapshot() -> dict[str, Any]:
    """Every flag's current value, for commit trailers and benchmark records."""
    return {name: get(name) for name in DEFINITIONS}


def unknown_environment() -> list[str]:
    """``XLLM_SAMPLING_*`` environment variables that name no flag (a typo must not do nothing)."""
    known = {d.env for d in DEFINITIONS.values()} | {FLAGS_FILE_ENV}
    return sorted(v for v in os.environ if v.startswith(ENV_PREFIX) and v not in known)


def warn_unknown_environment() -> None:
    """Warn once about each ``XLLM_SAMPLING_*`` variable that names no flag."""
    for var in unknown_environment():
        warnings.warn(f"{var} names no xllm_sampling flag; known flags: {', '.join(DEFINITIONS)}", stacklevel=2)
