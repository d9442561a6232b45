"""Export random-weight presets to GGUF, load them back, and check the logits are unchanged.

Run on the H200 box: `PYTHONPATH=. python3 scripts/gguf_export_check.py [preset:type ...]`
(default: qwen2.5-0.5b:q8_0 qwen2.5-7b:q4_0). The .gguf files go to $GGUF_DIR (default
/tmp/batchbench-gguf) and stay there for llama-batched-bench; results.json goes to $OUT if set.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

import mlx.core as mx
import numpy as np

from batchbench.loaders import load_model
from batchbench.loaders.export_gguf import export_gguf
from batchbench.presets import make_preset, reference_logits

TOKENS = list(range(1, 400, 25))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def check(preset: str, qtype: str, gguf_dir: str) -> dict:
    row = {"preset": preset, "type": qtype}
    out = os.path.join(gguf_dir, f"{preset}-{qtype}.gguf")
    t = time.perf_counter()
    model, cfg = make_preset(preset, mx.float16, "none" if qtype == "f16" else qtype)
    row["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    s = export_gguf(model, out, qtype, config=cfg)
    row.update(export_s=time.perf_counter() - t, file_gb=s.n_bytes / 1e9, exact=s.exact_blocks,
               requantized=s.requantized, path=out, rss_gb_after_export=rss_gb())
    ref = reference_logits(model, TOKENS, dtype=mx.float16)
    del model
    mx.clear_cache()
    t = time.perf_counter()
    loaded = load_model(out, dtype=mx.float16)
    row.update(load_s=time.perf_counter() - t, quant=loaded.quant, n_params=loaded.n_params,
               weight_gb=loaded.weight_bytes / 1e9, n_ctx_train=loaded.n_ctx_train)
    got = reference_logits(loaded.model, TOKENS, dtype=mx.float16)
    row["max_abs_dlogit"] = float(np.abs(got - ref).max())
    row["ok"] = bool(row["max_abs_dlogit"] == 0.0 and s.requantized == 0)
    row["peak_gpu_gb"] = mx.get_peak_memory() / 1e9
    row["rss_gb"] = rss_gb()
    del loaded
    mx.clear_cache()
    return row


def main() -> None:
    variants = sys.argv[1:] or ["qwen2.5-0.5b:q8_0", "qwen2.5-7b:q4_0"]
    gguf_dir = os.environ.get("GGUF_DIR", "/tmp/batchbench-gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    rows = []
    for v in variants:
        preset, _, qtype = v.partition(":")
        try:
            rows.append(check(preset, qtype or "q4_0", gguf_dir))
        except Exception as e:  # keep going: one failure must not hide the others
            traceback.print_exc()
            rows.append({"preset": preset, "type": qtype, "error": f"{type(e).__name__}: {e}"})
        mx.reset_peak_memory()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gguf_export_check.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'variant':24} {'export s':>8} {'GB':>6} {'load s':>7} {'quant':>10} {'max|dl|':>8} {'peakGPU':>8} {'RSS':>6} ok")
    for r in rows:
        name = f"{r['preset']}:{r['type']}"
        if "error" in r:
            print(f"{name:24} ERROR {r['error'][:90]}")
            continue
        print(f"{name:24} {r['export_s']:8.1f} {r['file_gb']:6.2f} {r['load_s']:7.1f} {r['quant'][:10]:>10} "
              f"{r['max_abs_dlogit']:8.2g} {r['peak_gpu_gb']:8.1f} {r['rss_gb']:6.1f} {r['ok']}")
        print(f"  file: {r['path']}")


if __name__ == "__main__":
    main()
