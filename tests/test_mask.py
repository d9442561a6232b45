"""batchbench.kernels.mask: the twin against the NumPy rules, CUDA dispatch from the KV
cache, and the CUDA kernel emulated on the CPU and compiled for sm_90a."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import mask as K
from batchbench.kv_cache import KVCache
from conftest import assert_compile_for_sm90a, emulated, verify_emulated
from batchbench.verify.mask_cases import mask_cases, mask_reference, random_metadata, visibility

SEED = int(np.random.SeedSequence().entropy % (1 << 31))
N_CASES = len(mask_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_twin_matches_rules(dtype):
    rng = np.random.default_rng(SEED)
    bits, cell_pos = random_metadata(rng, 333, 37)
    seq = rng.integers(0, 37, 6).astype(np.int32)
    p1 = rng.integers(0, 400, 6).astype(np.int32)
    got = K.decode_mask_ref(mx.array(bits), mx.array(cell_pos)[:300], mx.array(seq), mx.array(p1), dtype)
    assert got.dtype == dtype and got.shape == (6, 300)
    want = mask_reference(bits, cell_pos[:300], seq, p1)
    np.testing.assert_array_equal(visibility(np.array(got.astype(mx.float32))), want.astype(np.float64))


def test_cache_uses_the_kernel_for_decode_windows(cuda_dispatch):
    c = KVCache(1, 2, 64, 512, 3, True, mx.float16)
    c.find_slot(np.repeat(np.arange(3), 40), np.tile(np.arange(40), 3))
    m = c.build_mask(np.arange(3), np.full(3, 40), 0, 512)
    spec, launch = cuda_dispatch[-1]
    assert spec is K.MASK_SPEC and m.shape == (3, 512) and launch.grid == (64, 3, 1)
    c.build_mask(np.arange(3), np.full(3, 40), 32, 512)  # prefill groups keep the MLX ops
    assert len(cuda_dispatch) == 1


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="bits must be uint32"):
        K.decode_mask_ref(mx.zeros((1, 8), mx.int32), mx.zeros((8,), mx.int32), mx.zeros((1,), mx.int32),
                          mx.zeros((1,), mx.int32), mx.float16)
    with pytest.raises(ValueError, match="seq and p1"):
        K.decode_mask_ref(mx.zeros((1, 8), mx.uint32), mx.zeros((8,), mx.int32), mx.zeros((2,), mx.int32),
                          mx.zeros((1,), mx.int32), mx.float16)


@pytest.fixture(scope="module")
def cases():
    return emulated(mask_cases(np.random.default_rng(SEED)))


@pytest.mark.parametrize("i", range(N_CASES))
def test_mask_kernel_emulated_matches_rules(cases, i):
    # more than 32 sequences (two bit words), shared and empty cells, future positions,
    # windows ending inside a thread's 8 cells; 0 / -inf exactly, nothing else
    verify_emulated(cases[i], SEED)


def test_mask_kernel_compiles_for_sm90a():
    assert_compile_for_sm90a([kl for c in mask_cases(np.random.default_rng(SEED)) for kl in c.kernels][:2])
