"""`python -m batchbench.verify`: compile and emulate the project's kernels on this CPU.

Prints one line per kernel case and exits non-zero if anything fails. A missing compiler
skips its checks with a note, unless BATCHBENCH_REQUIRE_TOOLCHAINS=1. `--dump DIR` writes
the exact sources MLX would compile (CUDA .cu, Metal .metal) for inspection or for Apple's
own compiler.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from batchbench.verify import cases as C
from batchbench.verify.rope_cases import qmm_rope_cases, rope_cases
from batchbench.verify import source, toolchain
from batchbench.verify.compile import check_all
from batchbench.verify.emulate import EmulationError, prebuild


def _tool(getter, notes: list[str]) -> bool:
    try:
        getter()
        return True
    except toolchain.ToolchainMissing as e:
        if toolchain.require_toolchains():
            raise
        notes.append(f"skipped: {e}")
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m batchbench.verify", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two cases per kernel")
    ap.add_argument("--seed", type=int, default=None, help="random inputs (default: fresh)")
    ap.add_argument("--no-compile", action="store_true", help="skip the clang/nvcc checks")
    ap.add_argument("--no-emulate", action="store_true", help="skip the CPU emulation")
    ap.add_argument("--dump", type=Path, default=None, help="write the generated sources here")
    args = ap.parse_args(argv)

    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (1 << 32))
    rng = np.random.default_rng(seed)
    groups = {
        "attention/cuda": C.attention_cases("cuda", rng, quick=args.quick),
        "attention/metal": C.attention_cases("metal", rng, quick=args.quick),
        "qmm/cuda": C.qmm_cases(rng, quick=args.quick),
        "rope/cuda": rope_cases(rng, quick=args.quick),
        "qmm-rope/cuda": qmm_rope_cases(rng, quick=args.quick),
    }
    notes: list[str] = []
    failed = 0
    print(f"batchbench.verify (seed {seed})")

    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for cs in groups.values():
            for c in cs:
                for spec, launch in c.kernels:
                    gen = source.generate(spec, launch)
                    ext = ".cu" if gen.backend == "cuda" else ".metal"
                    (args.dump / f"{gen.kernel_name[:120]}{ext}").write_text(gen.source)
        print(f"sources written to {args.dump}")

    if not args.no_compile:
        items = []
        if _tool(toolchain.nvcc, notes):
            items += [kl for g in ("attention/cuda", "qmm/cuda") for c in groups[g][:2] for kl in c.kernels]
        if _tool(toolchain.clang, notes):
            items += [c.kernels[0] for c in groups["attention/metal"]]
        t0 = time.time()
        for r in check_all(items):
            extra = f" regs={r.registers} spills={r.spill_stores}" if r.registers is not None else ""
            print(f"  compile {r.backend:5s} {'ok  ' if r.ok else 'FAIL'} {r.kernel_name}{extra}")
            if not r.ok:
                failed += 1
                print("    " + r.log.replace("\n", "\n    ")[:4000])
        print(f"  compile checks: {len(items)} in {time.time() - t0:.1f}s")

    if not args.no_emulate and _tool(toolchain.host_cxx, notes):
        t0 = time.time()
        prebuild([kl for cs in groups.values() for c in cs for kl in c.kernels])
        for g, cs in groups.items():
            for c in cs:
                try:
                    err, _ = c.verify()
                    print(f"  emulate {g:16s} ok   max err {err:.2e}  {c.name}")
                except (AssertionError, EmulationError) as e:
                    failed += 1
                    print(f"  emulate {g:16s} FAIL {e}")
        print(f"  emulation: {sum(len(cs) for cs in groups.values())} cases in {time.time() - t0:.1f}s")

    for n in notes:
        print("  " + n)
    print("FAILED" if failed else "all checks passed", f"({failed} failures)" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
