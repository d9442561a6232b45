"""The exact CUDA and Metal attention sources, emulated on the CPU, on a plan built the way the
decode loop builds it: cache-made mask and packed live-block rows (PackedLive)."""

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels.attention import decode_attention_ref, plan_decode_attention
from batchbench.kv_cache import KVCache

from batchbench.verify import toolchain


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_kernel_on_cache_built_plan(backend):
    from batchbench.verify.emulate import emulate

    toolchain.need(toolchain.host_cxx)  # skips without a compiler, fails in CI
    c = KVCache(1, 2, 64, 512, 3, True, mx.float16)
    c.find_slot(np.repeat(np.arange(3), 40), np.tile(np.arange(40), 3))  # 3 prompts of 40 cells
    for step in range(3):
        c.find_slot(np.arange(3), np.full(3, 40 + step))  # interleaved decode cells
    seq, pos = np.arange(3), np.full(3, 42)
    plan = c.prepare(seq, pos, np.arange(3))  # places this step's tokens too
    assert plan.decode and plan.live_blocks is not None
    rng = np.random.default_rng(7)
    q = mx.array(rng.standard_normal((1, 8, 3, 64)).astype(np.float16))
    k = mx.array(rng.standard_normal((1, 2, 512, 64)).astype(np.float16))
    v = mx.array(rng.standard_normal((1, 2, 512, 64)).astype(np.float16))
    ref = np.array(decode_attention_ref(q, k, v, scale=0.125, mask=plan.mask,
                                        live_blocks=plan.live_blocks).astype(mx.float32))
    spec, launch = plan_decode_attention(backend, q, k, v, plan.mask, scale=0.125, skip=True,
                                         live_blocks=plan.live_blocks)
    out = emulate(spec, launch).outputs[0].transpose(0, 2, 1, 3).astype(np.float32)
    np.testing.assert_allclose(out, ref, atol=3e-3, rtol=3e-3)
