"""batchbench: llama-batched-bench on MLX with a unified multi-sequence KV cache."""

import os

# MLX's CUDA back-end submits its CUDA graph every 100 ops (or 1000 MB of op inputs) on Hopper;
# a decode step is 400-800 small ops, and each submit leaves the GPU waiting. Measured on the
# H200 (results/h200-2026-11-29-s2/overhead-probe.txt): 1000 ops per graph cut host time per
# op from 4.3 to 2.0 us and kernel gaps from 4.0 to 1.7 us. The MB limit stays: without it the
# temporaries of a prefill (dequantized weights) pile up until the device runs out of memory.
# MLX reads the value once, when it creates its first GPU stream: set it before importing mlx.
os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "1000")

__version__ = "0.1.0"


class SettingError(ValueError):
    """A BATCHBENCH_* environment setting that cannot be read (the CLI prints it as one line)."""


ON_OFF = ("0", "1")  # the allowed values of a switch


def env_choice(var: str, default: str, allowed: tuple[str, ...]) -> str:
    """A setting from the environment that takes one of `allowed`, or `default`; any other
    value is a one-line SettingError, not a silent default."""
    v = os.environ.get(var, default)
    if v not in allowed:
        raise SettingError(f"{var} must be one of {', '.join(allowed)}, not {v!r}")
    return v


def env_number(var: str, default, kind=int):
    """A numeric tuning setting from the environment, or `default`; a bad value is a one-line
    SettingError (the CLI prints it), not a traceback."""
    v = os.environ.get(var)
    if v is None:
        return default
    try:
        return kind(v)
    except ValueError:
        raise SettingError(f"{var} must be a number, not {v!r}") from None
