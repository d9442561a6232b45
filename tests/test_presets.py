import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from batchbench.presets import PRESETS, make_preset, param_count, weight_bytes


@pytest.mark.parametrize("quant,bits", [("q4_0", 4), ("q8_0", 8)])
def test_quantized_presets_are_exact_gguf_blocks(quant, bits):
    model, cfg = make_preset("tiny", mx.float16, quant)
    qls = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(qls) == 7 * cfg["num_hidden_layers"] + 1  # 7 per layer + lm_head
    for m in qls:
        assert m.group_size == 32 and m.bits == bits
        np.testing.assert_array_equal(np.array(m.biases), np.array(-(2 ** (bits - 1)) * m.scales))
    # codes are spread over the whole range, not constant
    w = np.array(qls[0].weight)
    nib = (w[..., None] >> (np.arange(0, 32, bits, dtype=np.uint32))) & ((1 << bits) - 1)
    assert nib.min() == 0 and nib.max() == 2**bits - 1


def test_param_count_matches_built_model():
    model, cfg = make_preset("tiny", mx.float32)
    n = sum(v.size for _, v in nn.utils.tree_flatten(model.parameters()))
    assert n == param_count(cfg)


def test_seven_b_shape_sizes():
    cfg = PRESETS["qwen2.5-7b"]
    assert 7.5e9 < param_count(cfg) < 7.7e9
    # 4-bit codes + fp16 scale and bias per 32 weights (5 bits a weight) for the linears, and
    # the 1.09 GB embedding kept in fp16 (only B rows of it are read per step)
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    expect = (param_count(cfg) - emb) * 5 / 8 + emb * 2
    assert weight_bytes(cfg, mx.float16, "q4_0") == pytest.approx(expect, rel=1e-6)
    # BB_QMM_SB_PACK keeps each group's scale and bias a second time, as pairs
    packed = expect + (param_count(cfg) - emb) * 4 / 32
    assert weight_bytes(cfg, mx.float16, "q4_0", packed=True) == pytest.approx(packed, rel=1e-6)
    assert weight_bytes(cfg, mx.float16, "none", packed=True) == param_count(cfg) * 2


def test_seeded_presets_repeat():
    a, _ = make_preset("tiny", mx.float32, seed=5)
    b, _ = make_preset("tiny", mx.float32, seed=5)
    c, _ = make_preset("tiny", mx.float32, seed=6)
    wa = np.array(a.model.layers[0].mlp.up_proj.weight)
    assert np.array_equal(wa, np.array(b.model.layers[0].mlp.up_proj.weight))
    assert not np.array_equal(wa, np.array(c.model.layers[0].mlp.up_proj.weight))
