"""The tiny model (fp16, q4_0) decoding with the 4-bit matmul's CUDA kernels emulated on the CPU,
prompts and decode steps, against the same model on MLX ops: the kernels as the model chains
them (fused norms, the gate product, residuals, the norm left pending between launches)."""

import types
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from batchbench.bench import Mode, Runner
from batchbench.kernels import qmm, qmv8
from batchbench.kernels import spec as kspec
from batchbench.kv_cache import KVCache
from batchbench.presets import make_preset
from batchbench.verify import toolchain
from batchbench.verify.emulate import emulate
from test_model_batching import run_batched


def _logits(monkeypatch, cuda: bool, norm_pre: bool, launched: list, split_hidden: bool = False,
            dq_mode: str = "lop3", n_seq: int = 2, sb_pack: bool = False, x8: bool = False,
            wpack: str = "0") -> np.ndarray:
    model, _ = make_preset("tiny", mx.float16, "q4_0", seed=4)
    rng = np.random.default_rng(6)
    for layer in model.model.layers:  # a weight per norm, so that a misplaced one shows
        for n in (layer.input_layernorm, layer.post_attention_layernorm):
            n.weight = mx.array(rng.uniform(0.5, 1.5, n.weight.shape).astype(np.float32)).astype(mx.float16)
    # only qmm sees CUDA: attention, RoPE and masks stay on their MLX twins
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="cuda" if cuda else "cpu"))
    monkeypatch.setattr(qmv8, "backend", types.SimpleNamespace(BACKEND="cuda" if cuda else "cpu"))
    monkeypatch.setattr(qmm, "X8", x8)
    monkeypatch.setattr(qmm, "SB_PACK", "1" if sb_pack else "0")  # read by the swaps below
    monkeypatch.setattr(qmm, "DQ_MODE", dq_mode)  # sub: the swaps also note each layer's scale_max
    monkeypatch.setattr(qmm, "WPACK", wpack)  # the swaps also repack the weights (and with pairs the pairs)
    # no RoPE / K-V-write pair epilogue: it writes the cache in place, which emulation cannot;
    # with x8 the gate/up rows paired (the int8 kernel's gate product), as on CUDA
    monkeypatch.setattr(qmm, "FUSE_ROPE", False)
    qmm.fuse_quantized_projections(model, pair_order=x8)
    qmm.use_fast_quantized_linears(model)

    def emulated(ks, launch):
        launched.append((ks.name, dict(launch.template).get("DQ"), dict(launch.template).get("SBP"),
                         dict(launch.template).get("WP")))
        res = emulate(ks, launch, schedules=("forward",))
        return [mx.array(o).astype(dt) for o, dt in zip(res.outputs, launch.output_dtypes)]

    monkeypatch.setattr(qmm, "NORM_PRE", norm_pre)
    monkeypatch.setattr(kspec, "run", emulated)
    if split_hidden:  # o_proj and down_proj (N = hidden) on two K-slices, as at M > 8 on the 7B shape
        choose = qmm.choose_config
        monkeypatch.setattr(qmm, "choose_config", lambda m, n, k, bits: (
            replace(choose(m, n, k, bits), s=2, blocks=0) if n == model.args.hidden_size else choose(m, n, k, bits)))
    a = model.args
    cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, 512, 2, True, mx.float16)
    runner = Runner(model, cache, Mode("t", True), 2048, 64, compiled=False)
    prompts = [rng.integers(0, 512, 7) for _ in range(n_seq)]
    steps = [rng.integers(0, 512, n_seq) for _ in range(2)]
    return run_batched(runner, prompts, steps)


@pytest.mark.parametrize("norm_pre,split_hidden,dq,sb_pack,wpack", [
    (False, False, "lop3", False, "0"), (True, False, "lop3", False, "0"), (False, True, "lop3", False, "0"),
    (True, False, "lop3b", False, "0"), (True, True, "lop3", True, "0"), (True, False, "sub", True, "0"),
    (False, True, "sub", True, "1"), (True, False, "sub", True, "pairs")])
def test_model_decodes_through_emulated_qmm_kernels(monkeypatch, norm_pre, split_hidden, dq, sb_pack, wpack):
    """Logits within fp16 rounding of the MLX-op model, and the kernels that were meant to run
    did. norm_pre: o_proj and down_proj write y * weight and tile sums, q/k/v, gate/up and
    lm_head take them. split_hidden: o_proj and down_proj split K and their reduce kernel
    writes the next norm (BB_QMM_NORM_OUT), so the consumers run plain. Else each consumer
    normalizes x itself. lop3b (one sequence): the decode steps' matmuls (one token) dequantize
    their weights without the bias (BB_QMM_DQ=lop3b, DQ = 2), the prompt's with it. sb_pack:
    every layer's scales and biases packed as pairs at the swap (BB_QMM_SB_PACK), which every
    main kernel here reads (register stages); the MLX-op model keeps the two arrays. sub (packed):
    every main kernel dequantizes through fp16 subnormals (BB_QMM_DQ=sub, DQ = 3), the swaps
    having found the q4_0 scales below 2. wpack 1: every main kernel reads the weights repacked at
    the swap (BB_QMM_WPACK, WP = 1); pairs: the packed pairs too (WP = 2)."""
    toolchain.need(toolchain.host_cxx)
    lop3b = dq == "lop3b"
    n_seq = 1 if lop3b else 2
    ref = _logits(monkeypatch, False, False, [], n_seq=n_seq)
    runs: list[tuple[str, int, bool | None, int | None]] = []
    got = _logits(monkeypatch, True, norm_pre, runs, split_hidden, dq, n_seq, sb_pack, wpack=wpack)
    launched = [name for name, *_ in runs]
    main = [(sbp, wp) for name, d, sbp, wp in runs if d is not None]  # the main kernels (reduces have no DQ)
    assert main and all(sbp is sb_pack and wp == {"0": 0, "1": 1, "pairs": 2}[wpack] for sbp, wp in main)
    if lop3b:  # a decode step's 9 launches at one token take DQ = 2, but layer 0's q/k/v (its norm
        # fused: the embedding has no producer that wrote its parts); the prompt's 7 rows keep DQ = 1
        # but for lm_head, which takes the last row only
        assert sum(r[1] == 2 for r in runs) == 2 * 8 + 1 and {r[1] for r in runs} == {1, 2}
    main_dq = {r[1] for r in runs if r[1] is not None}
    assert main_dq == ({3} if dq == "sub" else {1, 2} if lop3b else {1})
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    if split_hidden:
        assert {"bb_qmm_redn_r", "bb_qmm_b", "bb_qmm"} <= set(launched)
        # layer 0's q/k/v normalizes its x (the embedding) itself, layer 1's takes down's norm
        assert launched.count("bb_qmm_b_n") == launched.count("bb_qmm_b") > 0
    elif norm_pre:
        assert {"bb_qmm_r_no", "bb_qmm_r_g_no", "bb_qmm_b_np", "bb_qmm_np"} <= set(launched)
        assert "bb_qmm_n" not in launched
    else:
        assert {"bb_qmm_r", "bb_qmm_r_g", "bb_qmm_b_n", "bb_qmm_n"} <= set(launched)
        assert not any(name.endswith(("_no", "_np")) for name in launched)


def test_model_decodes_with_int8_activations_emulated(monkeypatch):
    """BB_QMM_X8=1, one sequence: the decode steps' o_proj, gate/up, down_proj and lm_head (one
    token each) run the int8-activation kernel (emulated) with their epilogues chained as on
    the fp16 path: down_proj and o_proj write the next norm's share (NOUT), gate/up, lm_head
    and the fp16 q/k/v kernel take it (NPRE). Logits
    stay near the MLX-op model's (int8 x adds ~1e-2 of max|y| a matmul, not fp16 rounding)."""
    toolchain.need(toolchain.host_cxx)
    monkeypatch.setenv("BATCHBENCH_SMS", "4")  # 8 blocks a launch: fewer emulated threads
    ref = _logits(monkeypatch, False, True, [], n_seq=1)
    runs: list = []
    got = _logits(monkeypatch, True, True, runs, n_seq=1, x8=True)
    launched = [name for name, *_ in runs]
    x8 = [n for n in launched if n.startswith("bb_qmv8")]
    # a decode step: o_proj (residual, share out), gate/up (share in), down (residual, share
    # out) a layer, and lm_head (share in); two layers, two steps, plus the prompt's lm_head
    assert len(x8) == 2 * (3 * 2 + 1) + 1
    # o_proj and down_proj: the residual and the share out; gate/up and lm_head (the prompt's
    # too: its down_proj's fp16 kernel wrote the share) take a share in
    assert sum(n.endswith("_r_o") for n in x8) == 2 * 2 * 2
    assert sum(n.endswith("_p") for n in x8) == 2 * 2 + 3
    assert "bb_qmm_b_np" in launched  # layer 1's q/k/v takes down_proj's share
    assert np.isfinite(got).all()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 2e-2
