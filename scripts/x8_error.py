"""How much error do int8 activations (`batchbench.kernels.qmv8`) add next to what the 4-bit
weights already carry? Random fp16 weights (N(0, 0.02)) quantized to 4 bits in groups of 32,
x Gaussian or heavy-tailed (Gaussian times exp(Gaussian): a few large values a group). Prints,
for a few 7B shapes at M=1, the rms relative error of y with the 4-bit weights against the fp16
weights, and of y with int8 x (the kernel's twin) against exact x on the same 4-bit weights.
Runs on any back-end (the twin; CPU: ~1 min).

    PYTHONPATH=. python3 scripts/x8_error.py
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench.kernels import qmv8


def rms_rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(((a - ref) ** 2).mean()) / np.sqrt((ref ** 2).mean()))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"mlx {mx.__version__}, {mx.default_device()}; seed 0")
    print("| matrix | x | 4-bit weights vs fp16 weights | int8 x vs exact x (4-bit weights) | int8 x, max |err| / max |y| |")
    print("|---|---|---|---|---|")
    for name, n, k in (("o_proj", 3584, 3584), ("down", 3584, 18944), ("gate/up (4096 rows)", 4096, 3584)):
        w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.02).astype(mx.float16)
        wq, s, b = mx.quantize(w, group_size=32, bits=4)
        w4 = mx.dequantize(wq, s, b, group_size=32, bits=4).astype(mx.float32)
        for kind in ("gaussian", "heavy-tailed"):
            xf = rng.standard_normal((1, k)).astype(np.float32)
            if kind == "heavy-tailed":
                xf = xf * np.exp(rng.standard_normal((1, k)).astype(np.float32))
            x = mx.array(xf).astype(mx.float16).astype(mx.float32)
            yw = np.array(x @ w.astype(mx.float32).T)
            y4 = np.array(x @ w4.T)
            y8 = np.array(qmv8.twin(x, wq, s.astype(mx.float32), b.astype(mx.float32)))
            print(f"| {name} | {kind} | {rms_rel(y4, yw):.2e} | {rms_rel(y8, y4):.2e} | "
                  f"{np.abs(y8 - y4).max() / np.abs(y4).max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
