"""Qwen2 decoder: Llama layout with q/k/v biases and a 1e6 RoPE base."""

from __future__ import annotations

from dataclasses import dataclass

from batchbench.models import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "qwen2"
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @property
    def qkv_bias(self) -> bool:
        return True

    def __post_init__(self):
        super().__post_init__()
        # Qwen2 never carries head_dim in its config; it is always hidden / heads.
        self.head_dim = self.hidden_size // self.num_attention_heads
        # o_proj has no bias in Qwen2 even though q/k/v do.
        self.attention_bias = False


class Model(llama.Model):
    pass
