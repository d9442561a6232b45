"""`batchbench export-gguf`: write a random-weight preset as a GGUF that llama.cpp loads as is.

Quantized presets hold MLX affine weights with biases = -2^(bits-1) * scale, i.e. exactly GGUF
Q4_0 / Q8_0, so their blocks are repacked bit for bit. Tensors are converted and written one at
a time, so a 7B export holds the model plus one tensor, never two copies.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Union

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from batchbench.loaders.gguf import _GLOBAL, _LAYER, permute

TYPES = {"f16": None, "q8_0": 8, "q4_0": 4}
_QTYPE = {4: T.Q4_0, 8: T.Q8_0}
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_TO_GGUF = {v: k for k, v in _GLOBAL.items()}
_LAYER_TO_GGUF = {v: k for k, v in _LAYER.items()}


@dataclasses.dataclass
class ExportSummary:
    path: str
    arch: str
    type: str
    n_tensors: int
    n_bytes: int
    exact_blocks: int  # quantized tensors repacked bit for bit
    requantized: int  # float or incompatible tensors quantized with gguf's reference quantizer


def gguf_name(path: str) -> str:
    """mlx-lm parameter module path -> GGUF tensor base name (inverse of loaders.gguf.hf_name)."""
    if path in _TO_GGUF:
        return _TO_GGUF[path]
    parts = path.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER_TO_GGUF:
        return f"blk.{parts[2]}.{_LAYER_TO_GGUF['.'.join(parts[3:])]}"
    raise ValueError(f"cannot export parameter {path}: no GGUF name for it")


def vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Minimal SentencePiece-style vocabulary llama.cpp accepts: specials, 256 byte tokens, fillers."""
    if n_vocab < 259:
        raise ValueError(f"n_vocab {n_vocab} is too small for a llama vocabulary (needs >= 259)")
    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types += [tt.NORMAL] * (n_vocab - len(types))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(n_vocab - 259)]
    return tokens, scores, [int(t) for t in types]


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def _q_blocks(m: dict[str, mx.array], bits: int) -> np.ndarray | None:
    """MLX affine (group 32) weight -> GGUF Q4_0/Q8_0 block bytes [rows, n_blocks * size], or None if not exact.

    The repacking runs in MLX (on the GPU where there is one): a 7B export is ~7e9 nibbles.
    """
    scales, biases = m["scales"], m["biases"]
    d = scales.astype(mx.float16)
    exact = mx.array_equal(d.astype(scales.dtype), scales) and mx.array_equal(
        biases, (-(2 ** (bits - 1)) * scales).astype(biases.dtype)
    )
    if not exact.item():
        return None
    w = m["weight"]
    rows = w.shape[0]
    d = mx.view(d, mx.uint8).reshape(rows, -1, 2)  # little-endian fp16 bytes
    if bits == 4:
        shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
        q = ((w[..., None] >> shifts) & 0xF).astype(mx.uint8).reshape(rows, -1, 32)
        # Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble).
        qs = q[..., :16] | (q[..., 16:] << 4)
    else:
        # MLX 8-bit: element k in byte k of the little-endian words; GGUF stores q - 128 as int8.
        qs = mx.view(w, mx.uint8).reshape(rows, -1, 32) ^ 0x80
    return np.array(mx.concatenate([d, qs], axis=-1).reshape(rows, -1))


Plan = list[tuple[str, tuple, Any, Callable[[], np.ndarray]]]


def _tensor_plan(model: nn.Module, cfg: dict, type: str) -> tuple[Plan, dict[str, int], str]:
    """(gguf name, byte shape, GGML type, producer) per tensor, the repack stats, the GGUF arch.

    Producers run one at a time while writing, so only one converted tensor exists at once.
    """
    arch = cfg["model_type"] if cfg["model_type"] != "mistral" else "llama"
    bits = TYPES[type]
    modules: dict[str, dict[str, mx.array]] = {}
    for k, v in tree_flatten(model.parameters()):
        mod, leaf = k.rsplit(".", 1)
        modules.setdefault(mod, {})[leaf] = v
    layer_bits = {p: getattr(m, "bits", None) for p, m in model.named_modules()}
    layer_group = {p: getattr(m, "group_size", None) for p, m in model.named_modules()}
    if any(getattr(m, "mode", "affine") != "affine" for _, m in model.named_modules()):
        raise ValueError("only float or affine-quantized models can be exported")
    heads = {"self_attn.q_proj": cfg["num_attention_heads"],
             "self_attn.k_proj": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    stats = {"exact": 0, "requant": 0}
    plan = []

    def order(path: str) -> tuple:
        parts = path.split(".")
        if parts[:2] == ["model", "layers"]:
            return (1, int(parts[2]), list(_LAYER).index(_LAYER_TO_GGUF[".".join(parts[3:])]))
        return (0, ["model.embed_tokens", "model.norm", "lm_head"].index(path), 0)

    for path in sorted(modules, key=order):
        m = modules[path]
        name = gguf_name(path)
        n_head = heads.get(path.split(".", 3)[-1]) if arch == "llama" else None

        def fix(a: np.ndarray, n_head=n_head) -> np.ndarray:
            # llama.cpp's llama arch expects Q/K rows in its interleaved-RoPE order.
            return np.ascontiguousarray(permute(a, n_head)) if n_head else a

        if "bias" in m:
            b = m["bias"]
            plan.append((f"{name}.bias", tuple(b.shape), T.F32, lambda b=b, fix=fix: fix(_np(b).astype(np.float32, copy=False))))
        w = m["weight"]
        src_bits = layer_bits.get(path)
        if w.ndim == 1:  # norms stay F32, as llama.cpp writes them
            plan.append((f"{name}.weight", tuple(w.shape), T.F32, lambda w=w: _np(w).astype(np.float32, copy=False)))
            continue
        rows = w.shape[0]
        cols = w.shape[1] * 32 // src_bits if src_bits else w.shape[1]

        def as_float(m=m, src_bits=src_bits, group=layer_group.get(path)) -> np.ndarray:
            if src_bits:
                x = mx.dequantize(m["weight"], m["scales"], m["biases"], group_size=group, bits=src_bits)
                return _np(x.astype(mx.float32))
            return _np(m["weight"])

        if bits is None or (not src_bits and path == "model.embed_tokens") or cols % 32:
            # The embedding stays float (as the preset holds it), so the round trip is lossless.
            plan.append((f"{name}.weight", (rows, cols), T.F16, lambda f=as_float, fix=fix: fix(f().astype(np.float16, copy=False))))
            continue
        qtype = _QTYPE[bits]
        size = gguf.GGML_QUANT_SIZES[qtype][1]

        exact_ok = src_bits == bits and layer_group.get(path) == 32

        def produce(m=m, exact_ok=exact_ok, qtype=qtype, fix=fix, f=as_float) -> np.ndarray:
            blocks = _q_blocks(m, bits) if exact_ok else None
            if blocks is None:
                stats["requant"] += 1
                blocks = gguf.quants.quantize(f(), qtype)
            else:
                stats["exact"] += 1
            return fix(blocks)

        plan.append((f"{name}.weight", (rows, cols // 32 * size), qtype, produce))
    return plan, stats, arch


def _add_metadata(w: gguf.GGUFWriter, cfg: dict, type: str, name: str) -> None:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPE[type]))
    if TYPES[type]:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 1e6 if cfg["model_type"] == "qwen2" else 1e4)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6 if cfg["model_type"] == "qwen2" else 1e-5)))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    scaling = cfg.get("rope_scaling")
    if scaling:
        if scaling.get("type", scaling.get("rope_type")) != "linear":
            raise ValueError(f"cannot export RoPE scaling {scaling}")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))
    tokens, scores, types = vocab(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)


def export_gguf(
    preset_or_model: Union[str, nn.Module],
    out_path: str,
    type: str = "q4_0",
    *,
    config: dict | None = None,
    dtype=mx.float16,
    seed: int = 0,
) -> ExportSummary:
    """Write a GGUF of a preset (built here with random weights) or of a model already built."""
    if type not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, not {type!r}")
    if isinstance(preset_or_model, str):
        from batchbench.presets import make_preset

        label = preset_or_model
        model, config = make_preset(preset_or_model, dtype, type if TYPES[type] else "none", seed=seed)
    else:
        model, label = preset_or_model, "model"
        config = config or dataclasses.asdict(model.args)
    if config.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"cannot export model_type {config.get('model_type')!r}")
    plan, stats, arch = _tensor_plan(model, config, type)

    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"output directory {out_dir} does not exist")
    tmp = out_path + ".part"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_metadata(writer, config, type, f"batchbench-random-{label}")
        for name, shape, qtype, _ in plan:
            if qtype in (T.F32, T.F16):
                dt = np.float32 if qtype == T.F32 else np.float16
                writer.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
            else:
                writer.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, shape, _, produce in plan:
            data = produce()
            assert data.shape == shape, (data.shape, shape)
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return ExportSummary(out_path, arch, type, len(plan), os.path.getsize(out_path), stats["exact"], stats["requant"])


def export_main(preset: str, type: str, out: str) -> ExportSummary:
    """Entry point for `batchbench export-gguf --preset NAME --type T OUT.gguf`."""
    s = export_gguf(preset, out, type)
    note = f", {s.requantized} requantized (lossy)" if s.requantized else ""
    print(f"wrote {s.path}: {s.arch} {s.type}, {s.n_tensors} tensors, {s.n_bytes / 2**20:.1f} MiB{note}")
    return s


def register(app) -> None:
    """Add `batchbench export-gguf` to a Typer app."""
    import typer

    @app.command("export-gguf")
    def export_cmd(
        out: str = typer.Argument(..., help="output .gguf file"),
        preset: str = typer.Option(..., "--preset", help="preset name (see `batchbench presets`)"),
        type: str = typer.Option("q4_0", "--type", help="f16, q8_0 or q4_0"),
    ) -> None:
        """Write a random-weight preset as a GGUF that llama.cpp and batchbench both load."""
        try:
            export_main(preset, type, out)
        except (ValueError, OSError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            raise typer.Exit(1) from None
