"""CPU verification of the custom GPU kernels: exact MLX sources, compile checks, emulation.

    from batchbench.verify import generate, check, emulate
    gen = generate(spec, launch)        # the source MLX would compile (Metal or CUDA)
    res = check(spec, launch)           # clang (Metal) / nvcc sm_90a (CUDA); res.ok, res.log
    out = emulate(spec, launch)         # run it on the CPU; out.outputs are numpy arrays

`python -m batchbench.verify` runs all of it on the project's kernels.
"""

from batchbench.verify.compile import CompileError, CompileResult, assert_compiles, check
from batchbench.verify.emulate import EmulationError, EmuResult, RaceError, emulate
from batchbench.verify.source import Generated, generate, traced_metal_source
from batchbench.verify.toolchain import ToolchainMissing, require_toolchains

__all__ = [
    "CompileError",
    "CompileResult",
    "EmuResult",
    "EmulationError",
    "Generated",
    "RaceError",
    "ToolchainMissing",
    "assert_compiles",
    "check",
    "emulate",
    "generate",
    "require_toolchains",
    "traced_metal_source",
]
