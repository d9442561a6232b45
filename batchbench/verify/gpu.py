"""On a CUDA machine: the emulated variant and the real one, side by side on the GPU.

    PYTHONPATH=. python3 -m batchbench.verify.gpu        # writes $OUT/verify_gpu.json if OUT is set

The CPU emulator runs each kernel's BB_PORTABLE helpers (plain CUDA) in place of inline PTX
(mma.sync, ldmatrix, cp.async, ld.global.nc). This runs every CUDA case of
batchbench.verify.cases through MLX on the GPU twice, with the PTX helpers and with the
portable ones, against the same float64 references, and reports how far the two variants
are apart. Agreement closes the gap between "the emulated source is right" and "the
compiled source is right". Each case runs twice per variant (split counters must be back
at zero for the second launch). Per-case errors are printed and the run continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import mlx.core as mx
import numpy as np

from batchbench.kernels import spec as kspec_mod
from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import cases as C
from batchbench.verify.mask_cases import mask_cases
from batchbench.verify.qmv8_cases import model_shape_cases as qmv8_model_shape_cases
from batchbench.verify.qmv8_cases import qmv8_cases
from batchbench.verify.rope_cases import qmm_rope_case, qmm_rope_cases, rope_cases


def _np(x) -> np.ndarray:
    if isinstance(x, mx.array):
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)
    return np.asarray(x)


def gpu_executor(portable: bool) -> C.Executor:
    def execute(spec: KernelSpec, launch: Launch):
        if portable:
            spec = dataclasses.replace(
                spec, header="#define BB_PORTABLE 1\n" + spec.header, name=spec.name + "_portable"
            )
        outs = kspec_mod.run(spec, launch)
        mx.eval(outs)
        return [_np(o) for o in outs], [_np(x) for x in launch.inputs]

    return execute


def model_shape_cases(rng: np.random.Generator) -> list[C.Case]:
    """The 7B shapes with choose_config's own geometry (too large for the CPU emulator). At one
    token: q/k/v with the norm and RoPE (4 warps along K, one block per tile) and the
    down projection with the residual (two chunks a stage over 148 chunks, one block per tile);
    at 8 tokens with the subnormal dequantization (BB_QMM_DQ=sub), the gate/up pair with a
    pending norm and down_proj over its split K, weights of std 0.02."""
    return [qmm_rope_case(rng, m=1, n_heads=28, n_kv_heads=4, head_dim=128, k=3584, group_size=32,
                          bias=True, norm=True),
            C.qmm_case(rng, m=1, n=3584, k=18944, group_size=32, res=True),
            C.qmm_case(rng, m=8, n=2 * 18944, k=3584, group_size=32, norm=True, prenorm=True, glu_pair=True,
                       packed=True, sub=True, wscale=0.02),
            C.qmm_case(rng, m=8, n=3584, k=18944, group_size=32, res=True, packed=True, sub=True, wscale=0.02)]


def _row_line(r: dict) -> str:
    """A case's line of the table (and its errors' lines)."""
    def cell(v):
        d = r.get(v, {})
        return f"{d['max_err']:9.2e}" if d.get("ok") else "    ERROR"
    diff = r.get("ptx_vs_portable")
    line = (f"{r['case'][:78]:78s} {cell('ptx')} {cell('portable') if 'portable' in r else '        -'} "
            f"{'' if diff is None else f'{diff:10.2e}':>10s} {r['atol']:8.1e}")
    for v in ("ptx", "portable"):
        if not r.get(v, {}).get("ok", True):
            line += f"\n    {v}: {r[v]['error'][:300]}"
    return line


KINDS = ("attn", "qmm", "qmm-rope", "rope", "mask", "qmv8")


def select(cases: list, only: str, match: str) -> tuple[list, str | None]:
    """The cases left by BATCHBENCH_VERIFY_ONLY (kinds, e.g. attn,rope) and BATCHBENCH_VERIFY_MATCH
    (names containing it; fp16,-split: containing all of these), and an error line where a
    filter leaves none."""
    kinds = [k.strip() for k in only.split(",") if k.strip()]
    if kinds:
        cases = [c for c in cases if any(c.name.startswith(f"{k}-cuda-") for k in kinds)]
        if not cases:
            return cases, f"BATCHBENCH_VERIFY_ONLY={','.join(kinds)} selects no case (kinds: {', '.join(KINDS)})"
    if match:
        cases = [c for c in cases if all(part in c.name for part in match.split(","))]
        if not cases:
            return cases, f"BATCHBENCH_VERIFY_MATCH={match} selects no case"
    return cases, None


def main() -> int:
    if not mx.cuda.is_available():
        print("batchbench.verify.gpu: this MLX has no CUDA back-end; nothing to do")
        return 2
    mx.set_default_device(mx.gpu)
    seed = int(os.environ.get("BATCHBENCH_VERIFY_SEED", np.random.SeedSequence().entropy % (1 << 32)))
    rng = np.random.default_rng(seed)
    # BATCHBENCH_VERIFY_QUICK=1: two attention and two rope cases, every qmm case, PTX only
    # (each case compiles its kernels twice with NVRTC: the full run takes minutes).
    quick = os.environ.get("BATCHBENCH_VERIFY_QUICK") == "1"
    cases = (C.attention_cases("cuda", rng, quick=quick) + C.qmm_cases(rng) + rope_cases(rng, quick=quick)
             + qmm_rope_cases(rng) + model_shape_cases(rng)
             + mask_cases(rng) + qmv8_cases(rng, quick=quick) + qmv8_model_shape_cases(rng))
    cases, error = select(cases, os.environ.get("BATCHBENCH_VERIFY_ONLY", ""),
                          os.environ.get("BATCHBENCH_VERIFY_MATCH", ""))
    if error:
        print(f"batchbench.verify.gpu: {error}", file=sys.stderr)
        return 2
    variants = ("ptx",) if quick else ("ptx", "portable")
    rows = []
    failures = 0
    # each row as its case ends, so that a run cut short by a time limit keeps what it checked
    print(f"\nbatchbench.verify.gpu (seed {seed}, mlx {mx.__version__}, {len(cases)} cases)", flush=True)
    print(f"{'case':78s} {'ptx err':>9s} {'portable':>9s} {'|ptx-port|':>10s} {'tol':>8s}", flush=True)
    for case in cases:
        row = {"case": case.name, "atol": case.atol}
        results = {}
        for variant in variants:
            t0 = time.time()
            try:
                err1, got = case.verify(gpu_executor(variant == "portable"))
                err2, got2 = case.verify(gpu_executor(variant == "portable"))  # counters reset?
                results[variant] = got
                row[variant] = {"ok": True, "max_err": max(err1, err2),
                                "repeat_identical": bool(np.array_equal(got, got2)),
                                "seconds": round(time.time() - t0, 2)}
            except Exception as e:  # report and go on with the next variant / case
                failures += 1
                row[variant] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "trace": traceback.format_exc(limit=3)}
        if "ptx" in results and "portable" in results:
            row["ptx_vs_portable"] = float(np.abs(results["ptx"] - results["portable"]).max())
        rows.append(row)
        print(_row_line(row), flush=True)

    print("FAILED" if failures else f"all cases within tolerance ({', '.join(variants)})")
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "verify_gpu.json"), "w") as f:
            json.dump({"seed": seed, "mlx": mx.__version__, "rows": rows}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
