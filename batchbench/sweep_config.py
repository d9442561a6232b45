"""Sweep configs: a TOML file of CLI options, `batchbench --config configs/NAME.toml`.

Keys are the CLI's long option names with `_` (or `-`) between words: `ctx_size = 40000`,
`npp = [0, 512, 4096]`, `flash_attn = "on"`. Options given on the command line win over the file
(`merge_config`).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Callable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None


class _Invalid(Exception):
    """A value that does not fit its key; the message completes 'key must be ...'."""


def _int(minimum: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _Invalid(f"an integer >= {minimum}")
        return v

    return check


def _int_list(minimum: int) -> Callable[[Any], list[int]]:
    """A list of ints, a single int, or a llama.cpp-style "0,512,4096" string."""

    def check(v: Any) -> list[int]:
        what = f'a list of integers >= {minimum} (or a "a,b,c" string)'
        if isinstance(v, str):
            try:
                v = [int(p) for p in v.split(",") if p.strip()]
            except ValueError:
                raise _Invalid(what) from None
        elif isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, list) or not v:
            raise _Invalid(what)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in v):
            raise _Invalid(what)
        return list(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid("true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid("a non-empty string")
    return v


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise _Invalid("one of " + ", ".join(f'"{c}"' for c in choices))
        return v

    return check


def _flash_attn(v: Any) -> str:
    # llama.cpp spells it several ways; keep the CLI's on|off|auto.
    aliases = {"on": "on", "enabled": "on", "true": "on", "1": "on",
               "off": "off", "disabled": "off", "false": "off", "0": "off",
               "auto": "auto", "-1": "auto"}  # fmt: skip
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int):
        v = str(v)
    if isinstance(v, str) and v.lower() in aliases:
        return aliases[v.lower()]
    raise _Invalid('"on", "off" or "auto" (or true/false)')


def _any_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid("an integer")
    return v


def _int_or_str(v: Any) -> int | str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Invalid('an integer or a string such as "all"')
    return v


# Key -> checker that returns the normalized value. Names follow the CLI's long options.
KEYS: dict[str, Callable[[Any], Any]] = {
    "model": _str,
    "ctx_size": _int(0),
    "batch_size": _int(1),
    "ubatch_size": _int(1),
    "npp": _int_list(0),
    "ntg": _int_list(1),
    "npl": _int_list(1),
    "pps": _bool,
    "tgs": _bool,
    "kv_unified": _bool,
    "flash_attn": _flash_attn,
    "output_format": _choice("md", "jsonl"),
    "seed": _int(0),
    "csv": _str,
    "no_skip": _bool,
    "own_blocks": _bool,
    "device": _choice("cpu", "gpu"),
    "dtype": _choice("auto", "float16", "bfloat16", "float32"),
    "quant": _choice("none", "q8_0", "q4_0"),
    "repetitions": _int(1),
    "ab": _str,  # the CLI checks the A/B kind (skip, kv, ...)
    # llama.cpp flags batchbench accepts and ignores, so a pasted command line still loads.
    "gpu_layers": _int_or_str,
    "threads": _any_int,
    "threads_batch": _any_int,
}


def validate(values: dict, source: str = "config") -> dict:
    """Normalized copy of `values`; ValueError names `source` and the offending key."""
    out: dict = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key not in KEYS:
            if isinstance(value, dict):
                raise ValueError(
                    f"{source}: [{raw_key}] tables are not supported; put keys at the top level"
                )
            hint = difflib.get_close_matches(key, KEYS, n=1)
            more = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(KEYS)}"
            raise ValueError(f"{source}: unknown key '{raw_key}'{more}")
        if key in out:
            raise ValueError(f"{source}: key '{key}' given twice ('{raw_key}')")
        try:
            out[key] = KEYS[key](value)
        except _Invalid as e:
            raise ValueError(f"{source}: key '{raw_key}' must be {e}, got {value!r}") from None
    return out


def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Validated option values from a TOML sweep config."""
    p = Path(path)
    if tomllib is None:
        raise ValueError(
            f"{p}: reading TOML on Python < 3.11 needs the 'tomli' package (pip install tomli)"
        )
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read config {p}: {e.strerror or e}") from None
    try:
        values = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: invalid TOML: {e}") from None
    return validate(values, str(p))


# File key -> the CLI function's parameter name, where the two differ.
PARAM_NAMES = {"csv": "csv_path"}


def _like_cli(value: Any, cli_value: Any) -> Any:
    # Comma-list flags reach the CLI as strings (`-npp 0,512` -> ["0,512"]); hand file lists over
    # in the same shape so one parser handles both.
    if isinstance(value, list) and isinstance(cli_value, list):
        return [str(v) for v in value]
    return value


def merge_config(file_values: dict, cli_values: dict, explicit: set[str]) -> dict:
    """Command line over file over CLI defaults.

    `cli_values` holds every option as the CLI parsed it (defaults included); `explicit` names
    the options the user actually typed. A typed list replaces the file's list, it does not
    extend it. File keys are long option names; where the CLI's parameters are named otherwise
    (`csv` -> `csv_path`, `kv_unified` -> the `kvu`/`no_kvu` pair) the result uses the CLI's names,
    and lists take the CLI's list-of-strings shape.
    """
    merged = dict(cli_values)
    for key, value in file_values.items():
        if key == "kv_unified" and ("kvu" in cli_values or "no_kvu" in cli_values):
            # Either flag typed on the command line decides; the file must not contradict it.
            if not explicit & {"kvu", "no_kvu", "kv_unified"}:
                merged["kvu"], merged["no_kvu"] = bool(value), not value
            continue
        name = PARAM_NAMES.get(key, key)
        if name not in cli_values:
            name = key
        if name in explicit or key in explicit:
            continue
        merged[name] = _like_cli(value, cli_values.get(name))
    return merged


def explicit_options(ctx: Any) -> set[str]:
    """Names of the parameters the user set on the command line (or via environment), from a
    click/Typer context, for `merge_config`."""
    # By name: recent Typer vendors its own click, whose ParameterSource is a different enum.
    given = ("COMMANDLINE", "ENVIRONMENT")
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", None) in given
    }


def config_paths(directory: Optional[str | Path] = None) -> list[Path]:
    """The shipped configs (repo's configs/ by default), for listings and tests."""
    d = Path(directory) if directory else Path(__file__).resolve().parent.parent / "configs"
    return sorted(d.glob("*.toml"))
