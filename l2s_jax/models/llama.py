"""Llama / Qwen2 family (transformers' LlamaForCausalLM, Qwen2ForCausalLM).

RMSNorm, rotary position embeddings (rotate-half layout, the config's theta
and rope scaling: default, linear, dynamic, llama3, yarn; see `rope.py`),
grouped-query attention, SwiGLU MLP; Qwen2 adds biases to the q/k/v
projections; the head is tied or not by config.

Param tree:
  embedder/embedding [V, D]
  blocks_i/{attn_norm, attn/{q [D, N, H], k [D, K, H], v [D, K, H], o [N, H, D],
            (q_bias, k_bias, v_bias, o_bias)}, mlp_norm, mlp/{gate, up [D, F], down [F, D]}}
  final_norm/scale
  lm_head [D, V]                   (only when untied)
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from l2s_jax.models import layers, rope
from l2s_jax.models.causal_lm import DecoderOnlyLM
from l2s_jax.models.layers import Array, param
from l2s_jax.models.rope import RopeScaling


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_hidden_layers: int = 22
  num_attention_heads: int = 32
  num_key_value_heads: int = 4
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # transformers' rope_parameters without the theta; a dict (a config override) is converted.
  rope_scaling: RopeScaling = RopeScaling()
  max_position_embeddings: int = 2048
  qkv_bias: bool = False  # Qwen2: True
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  model_type: str = "llama"  # "llama" or "qwen2": how to save it back
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer's activations in the backward pass

  def __post_init__(self):
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  @property
  def head_width(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads


def _qwen2(hidden, inter, n_layers, heads, kv, vocab=151936, tied=True, eps=1e-6):
  return LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=inter,
    num_hidden_layers=n_layers,
    num_attention_heads=heads,
    num_key_value_heads=kv,
    rms_norm_eps=eps,
    rope_theta=1e6,
    max_position_embeddings=32768,
    qkv_bias=True,
    tie_word_embeddings=tied,
    bos_token_id=151643,
    eos_token_id=151643,
    model_type="qwen2",
  )


def _llama3(hidden, inter, n_layers, factor, tied):
  """Llama 3.1 / 3.2 (their config.json values: 32 query and 8 key/value heads, theta 5e5,
  the llama3 rope scaling of an 8192-position original, 131072 positions)."""
  return LlamaConfig(
    vocab_size=128256,
    hidden_size=hidden,
    intermediate_size=inter,
    num_hidden_layers=n_layers,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", factor, 8192, low_freq_factor=1.0, high_freq_factor=4.0),
    max_position_embeddings=131072,
    tie_word_embeddings=tied,
    bos_token_id=128000,
    eos_token_id=128001,
  )


PRESETS: dict[str, LlamaConfig] = {
  "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2),
  "qwen2-1.5b": _qwen2(1536, 8960, 28, 12, 2),
  "qwen2-7b": _qwen2(3584, 18944, 28, 28, 4, vocab=152064, tied=False),
  "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2),
  "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2),
  "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2),
  "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, vocab=152064, tied=False),
  "tinyllama-1.1b": LlamaConfig(),
  # meta-llama/Llama-3.1-8B and Llama-3.2-1B (the 1B ties its head to the embedding).
  "llama-3.1-8b": _llama3(4096, 14336, 32, 8.0, tied=False),
  "llama-3.2-1b": _llama3(2048, 8192, 16, 32.0, tied=True),
}


def rotary_frequencies(c: LlamaConfig, positions_BT: Array) -> tuple[Array, float]:
  """(inv_freq [H/2], cos/sin scale) for these positions (only `dynamic` looks at them)."""
  inv_freq = rope.inv_freq_for(
    c.rope_scaling, c.rope_theta, c.head_width, c.max_position_embeddings, positions_BT
  )
  return inv_freq, rope.attention_scaling(c.rope_scaling)


class LlamaAttention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, index_B):
    c = self.config
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_width
    dt, pd = c.dtype, c.param_dtype
    init = layers.normal_init(c.initializer_range)
    zeros = nn.initializers.zeros

    def proj(name, heads, axis):
      w = param(self, name, init, (d, heads, h), ("embed", axis, "head_dim"), pd)
      y = layers.project(x_BTD, w.astype(dt))  # BTD,DNH->BTNH
      if c.qkv_bias:
        y = y + param(self, f"{name}_bias", zeros, (heads, h), (axis, "head_dim"), pd).astype(dt)
      return y

    inv_freq, rope_scale = rotary_frequencies(c, positions_BT)
    q = rope.apply_rotary(proj("q", n, "heads"), positions_BT, inv_freq, rope_scale)
    kk = layers.keys_layout(
      rope.apply_rotary(proj("k", k, "kv_heads"), positions_BT, inv_freq, rope_scale)
    )
    v = layers.heads_first(proj("v", k, "kv_heads"))
    if cache is not None:
      cache = layers.update_layer_cache(cache, kk, v, index_B)
      kk, v = cache["k"], cache["v"]
    out = layers.attend(q, kk, v, mask_BTS, scale=float(h) ** -0.5)
    o = param(self, "o", init, (n, h, d), ("heads", "head_dim", "embed"), pd)
    y = layers.project(out, o.astype(dt), n_in=2)  # BTNH,NHD->BTD
    if c.o_bias:
      y = y + param(self, "o_bias", zeros, (d,), ("embed",), pd).astype(dt)
    return y, cache


class LlamaMLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.config
    d, f, dt, pd = c.hidden_size, c.intermediate_size, c.dtype, c.param_dtype
    init = layers.normal_init(c.initializer_range)
    zeros = nn.initializers.zeros

    def dense(name, shape, axes, x):
      y = layers.project(x, param(self, name, init, shape, axes, pd).astype(dt))
      if c.mlp_bias:
        y = y + param(self, f"{name}_bias", zeros, shape[-1:], axes[-1:], pd).astype(dt)
      return y

    act = layers.activation(c.hidden_act)
    gate = dense("gate", (d, f), ("embed", "mlp"), x_BTD)  # BTD,DF->BTF
    up = dense("up", (d, f), ("embed", "mlp"), x_BTD)
    return dense("down", (f, d), ("mlp", "embed"), act(gate) * up)  # BTF,FD->BTD


class LlamaBlock(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, index_B):
    c = self.config
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    a, cache = LlamaAttention(c, name="attn")(
      norm("attn_norm")(x_BTD), positions_BT, mask_BTS, cache, index_B
    )
    x_BTD = x_BTD + a
    x_BTD = x_BTD + LlamaMLP(c, name="mlp")(norm("mlp_norm")(x_BTD))
    return x_BTD, cache


class Llama(DecoderOnlyLM):
  """Llama / Qwen2 causal LM. `__call__` takes transformers' forward inputs."""

  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embedder = layers.Embed(
      c.vocab_size, c.hidden_size, c.initializer_range, c.dtype, c.param_dtype
    )
    block = nn.remat(LlamaBlock) if c.remat else LlamaBlock
    self.blocks = [block(c) for _ in range(c.num_hidden_layers)]
    self.final_norm = layers.RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = param(
        self,
        "lm_head",
        layers.normal_init(c.initializer_range),
        (c.hidden_size, c.vocab_size),
        ("embed", "vocab"),
        c.param_dtype,
      )

  max_positions = None  # rotary positions: transformers does not cap them either

  def prefill_chunk_length(self, batch: int) -> int:
    # Dynamic NTK rope scales with each call's longest position: chunks would rotate the
    # prompt's early tokens unscaled where transformers' one call scales them.
    if self.config.rope_scaling.rope_type == "dynamic":
      return sys.maxsize
    return super().prefill_chunk_length(batch)

  def cache_shape(self) -> tuple[int, int, int]:
    c = self.config
    return c.num_hidden_layers, c.num_key_value_heads, c.head_width

  def scan_block(self) -> nn.Module:
    return LlamaBlock(self.config, parent=None)

  def embed(self, ids_BT: Array) -> Array:
    return self.embedder(ids_BT)

  def final_layer_norm(self, x_BTD: Array) -> Array:
    return self.final_norm(x_BTD)

  def logits(self, h_BTD: Array) -> Array:
    if self.config.tie_word_embeddings:
      return self.embedder.attend(h_BTD)
    return layers.project(h_BTD, self.lm_head.astype(self.config.dtype))  # BTD,DV->BTV
