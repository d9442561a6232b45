"""numpy decoders for GGUF tensor types that mx.load gets wrong (Q4_K) or that we do not trust it on.

Layouts follow ggml's block_q4_K / block_q6_K; tests check them against gguf.quants.dequantize.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144  # d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
Q6_K_BYTES = 210  # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d (fp16)
_ROWS_PER_CHUNK = 2048  # bounds the float32 temporaries on 7B-sized tensors


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = raw.shape[0]
    if raw.shape[-1] % block_bytes:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not a whole number of {block_bytes}-byte blocks")
    return raw.reshape(rows, -1, block_bytes)


def q4_k_affine(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows -> (nibbles uint8 [rows, cols], scales, biases float32 [rows, cols/32]).

    Each 32-weight sub-block is w = (d*sc)*q - dmin*m, i.e. exactly affine with group 32.
    """
    b = _blocks(raw, Q4_K_BYTES)
    rows, nb = b.shape[:2]
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = b[..., 4:16].astype(np.uint8)
    # 8 six-bit scales and mins: j<4 in the low 6 bits of bytes j / j+4, j>=4 split over byte j+4
    # (low/high nibble) and the top 2 bits of bytes j-4 / j.
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    scales = (d * sc.astype(np.float32)).reshape(rows, nb * 8)
    biases = -(dmin * mn.astype(np.float32)).reshape(rows, nb * 8)
    qs = b[..., 16:].reshape(rows, nb, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
    q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, nb * QK_K)
    return q, scales, biases


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    q, scales, biases = q4_k_affine(raw)
    rows = q.shape[0]
    w = q.reshape(rows, -1, 32).astype(np.float32) * scales[..., None] + biases[..., None]
    return w.reshape(rows, -1)


def dequantize_q6_k(raw: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    """Q6_K rows -> float [rows, cols]; w = d * scale[16-weight sub-block] * (q6 - 32)."""
    rows = raw.shape[0]
    out = np.empty((rows, raw.shape[1] // Q6_K_BYTES * QK_K), dtype=out_dtype)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        b = _blocks(raw[r0 : r0 + _ROWS_PER_CHUNK], Q6_K_BYTES)
        n, nb = b.shape[:2]
        ql = b[..., 0:128].reshape(n, nb, 2, 64)  # two halves of 128 weights
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [n, nb, 16]
        d = b[..., 208:210].copy().view(np.float16).astype(np.float32)
        # Within a half: weights l, l+32, l+64, l+96 take (ql[l], ql[l+32]) low nibbles, then high
        # nibbles, each topped with 2 bits of qh[l] (shift 0, 2, 4, 6).
        lo = np.concatenate([ql & 0xF, ql >> 4], axis=-1).reshape(n, nb, 2, 4, 32)
        hi = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
        q = (lo | (hi << 4)).astype(np.float32) - 32.0
        w = q.reshape(n, nb, 16, 16) * (d * sc)[..., None]
        out[r0 : r0 + n] = w.reshape(n, -1)
    return out


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    u = raw.view(np.uint16).astype(np.uint32) << 16
    return u.view(np.float32)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [rows, cols] -> MLX affine 4-bit words: element k in nibble k%8 of word k//8."""
    rows = q.shape[0]
    q = q.reshape(rows, -1, 8).astype(np.uint32)
    return (q << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)


def unpack_nibbles(w: np.ndarray) -> np.ndarray:
    rows = w.shape[0]
    q = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    return q.astype(np.uint8).reshape(rows, -1)
