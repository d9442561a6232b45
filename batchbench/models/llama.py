"""Llama-family decoder (llama, mistral-style llama) on the unified multi-sequence KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from batchbench.kernels.qmm import linear, linear_norm
from batchbench.kernels.rope import qkv_rope
from batchbench.models.base import BaseModelArgs, Hidden, QKVProjection, attention, hidden_parts, residual


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32000
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: Optional[dict[str, Any]] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.attention_bias)
        self.rope_theta = args.rope_theta
        self.rope_traditional = args.rope_traditional
        self.rope_scale = 1.0
        if args.rope_scaling and args.rope_scaling.get("type", args.rope_scaling.get("rope_type")) == "linear":
            self.rope_scale = 1.0 / float(args.rope_scaling["factor"])

    @property
    def rope(self) -> dict:
        """qkv_rope's keyword arguments for this layer."""
        return dict(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                    base=self.rope_theta, scale=self.rope_scale, traditional=self.rope_traditional)

    def project(self, x: mx.array, norm: nn.RMSNorm | None = None) -> mx.array:
        """The q/k/v projections of norm(x), side by side: [1, T, (Hq + 2 * Hkv) * D]."""
        if "qkv_proj" in self:  # one fused launch (batchbench.kernels.qmm.fuse_quantized_projections)
            return self.qkv_proj.fused(x, norm=norm)
        x = x if norm is None else norm(x)
        return mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)

    def qkv(self, x: mx.array, positions: mx.array, norm: nn.RMSNorm | None = None):
        """(q, k, v) [1, H, T, D] of norm(x), q and k rotated at positions."""
        return qkv_rope(self.project(x, norm), positions, **self.rope)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array, residual: mx.array | None = None,
                 norm: nn.RMSNorm | None = None, next_norm: nn.RMSNorm | None = None):
        """down(silu(gate(n)) * up(n)) (+ residual) with n = norm(x); with fused projections
        the norm, the gate product and the residual add happen inside the matmul launches.
        With next_norm (the next layer's input norm): a Hidden (`linear_norm`)."""
        glu = False
        if "gate_up_proj" in self:
            gu = self.gate_up_proj
            if gu.glu_paired:  # the gate product is the gate/up launch's epilogue
                a = gu.glu(x, norm=norm)
            else:
                a, glu = gu.fused(x, norm=norm), True
        else:
            x = x if norm is None else norm(x)
            a = nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if next_norm is None:
            return linear(self.down_proj, a, residual=residual, glu=glu)
        return Hidden(*linear_norm(self.down_proj, a, residual=residual, norm=next_norm, glu=glu))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    next_norm = None  # the next layer's input norm (LlamaModel sets it): outputs are then Hidden

    def post(self, x: mx.array, attn: mx.array):
        a = self.self_attn
        # h and the MLP's input norm(h), and the MLP's output and the next layer's input norm of
        # it: each one launch on CUDA where K is split (linear_norm)
        h, x_n, norm = linear_norm(a.o_proj, attn.transpose(0, 2, 1, 3).reshape(1, x.shape[1], -1), residual=x,
                                   norm=self.post_attention_layernorm)
        return self.mlp(x_n, residual=h, norm=norm, next_norm=self.next_norm)

    def __call__(self, x, mask, cache):
        """x: the residual stream (mx.array, or the previous layer's Hidden); a Hidden out
        where next_norm is set."""
        h, x_n, norm = hidden_parts(x, self.input_layernorm)
        a = self.self_attn
        # The projection, RoPE and the K/V write are one step of the cache: on CUDA one kernel,
        # writing the cache in place.
        q, keys, values = cache.store_qkv(QKVProjection(a, x_n, norm), mask.positions, a.rope)
        return self.post(h, attention(q, keys, values, a.scale, mask))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Each layer hands the next one its input norm where a launch can write it (Hidden).
        # Plain attributes, not parameters: weight loading updates these modules in place.
        for layer, nxt in zip(self.layers, [l.input_layernorm for l in self.layers[1:]] + [self.norm]):
            object.__setattr__(layer, "next_norm", nxt)

    def __call__(self, tokens: mx.array, mask, cache) -> mx.array | Hidden:
        """The last layer's output: a Hidden where it carries the final norm's input (Model.head)."""
        h = self.embed_tokens(tokens)
        for i, (layer, c) in enumerate(zip(self.layers, cache.layers), 1):
            h = layer(h, mask, c)
            if mask.eval_every and i % mask.eval_every == 0 and i < len(self.layers):
                mx.async_eval(residual(h))  # the GPU starts on these layers while Python builds the rest
        return h


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, mask, cache) -> mx.array:
        """tokens [1, T]; returns logits [n_out, vocab] for the rows in `mask.out_rows`."""
        return self.head(self.model(tokens, mask, cache), mask)

    def head(self, h, mask) -> mx.array:
        """Final norm and output projection of the rows in `mask.out_rows` (h: the last layer's
        output, plain or Hidden)."""
        _, h, norm = hidden_parts(h, self.model.norm)
        if mask.out_rows is not None:
            h = h[:, mask.out_rows]
            if hasattr(norm, "take_rows"):  # a norm its producer left pending per row (qmm.PendingNorm)
                norm = norm.take_rows(mask.out_rows)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h if norm is None else norm(h))[0]
        return linear(self.lm_head, h, norm=norm)[0]  # the norm fused where it can be

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers
