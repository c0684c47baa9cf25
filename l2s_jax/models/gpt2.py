"""GPT-2 (transformers' GPT2LMHeadModel semantics).

Learned absolute positions, pre-LayerNorm blocks, `gelu_new` MLP, output head
tied to the token embedding.

Param tree:
  wte/embedding [V, D], wpe [P, D]
  blocks_i/{ln_1, attn/{qkv [D, 3, N, H], qkv_bias [3, N, H], o [N, H, D], o_bias [D]},
            ln_2, mlp/{fc [D, F], fc_bias [F], proj [F, D], proj_bias [D]}}
  ln_f/{scale, bias}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from l2s_jax.models import layers
from l2s_jax.models.causal_lm import DecoderOnlyLM
from l2s_jax.models.layers import Array, param


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # None: 4 * n_embd
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  initializer_range: float = 0.02
  bos_token_id: int = 50256
  eos_token_id: int = 50256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False  # recompute each layer's activations in the backward pass

  @property
  def inner(self) -> int:
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head


PRESETS: dict[str, GPT2Config] = {
  "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
  "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
  "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
  "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
  "distilgpt2": GPT2Config(n_embd=768, n_layer=6, n_head=12),
}


class GPT2Attention(nn.Module):
  config: GPT2Config
  layer_idx: int

  @nn.compact
  def __call__(
    self,
    x_BTD: Array,
    positions_BT: Array,
    mask_BTS: Array,
    cache: dict[str, Array] | None,
    index_B: Array | None,
  ):
    c = self.config
    d, n, h, dt, pd = c.n_embd, c.n_head, c.head_dim, c.dtype, c.param_dtype
    init = layers.normal_init(c.initializer_range)
    qkv_w = param(self, "qkv", init, (d, 3, n, h), ("embed", None, "heads", "head_dim"), pd)
    qkv_b = param(
      self, "qkv_bias", nn.initializers.zeros, (3, n, h), (None, "heads", "head_dim"), pd
    )
    o_w = param(self, "o", init, (n, h, d), ("heads", "head_dim", "embed"), pd)
    o_b = param(self, "o_bias", nn.initializers.zeros, (d,), ("embed",), pd)

    qkv = layers.project(x_BTD, qkv_w.astype(dt)) + qkv_b.astype(dt)  # BTD,DCNH->BTCNH
    q = qkv[:, :, 0]
    k, v = layers.keys_layout(qkv[:, :, 1]), layers.heads_first(qkv[:, :, 2])
    if cache is not None:
      cache = layers.update_layer_cache(cache, k, v, index_B)
      k, v = cache["k"], cache["v"]
    scale = 1.0
    if c.scale_attn_weights:
      scale /= float(h) ** 0.5
    if c.scale_attn_by_inverse_layer_idx:
      scale /= float(self.layer_idx + 1)
    out = layers.attend(q, k, v, mask_BTS, scale=scale)
    return layers.project(out, o_w.astype(dt), n_in=2) + o_b.astype(dt), cache


class GPT2MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.config
    d, f, dt, pd = c.n_embd, c.inner, c.dtype, c.param_dtype
    init = layers.normal_init(c.initializer_range)
    fc = param(self, "fc", init, (d, f), ("embed", "mlp"), pd)
    fc_b = param(self, "fc_bias", nn.initializers.zeros, (f,), ("mlp",), pd)
    proj = param(self, "proj", init, (f, d), ("mlp", "embed"), pd)
    proj_b = param(self, "proj_bias", nn.initializers.zeros, (d,), ("embed",), pd)
    h = layers.activation(c.activation_function)(
      layers.project(x_BTD, fc.astype(dt)) + fc_b.astype(dt)
    )
    return layers.project(h, proj.astype(dt)) + proj_b.astype(dt)


class GPT2Block(nn.Module):
  config: GPT2Config
  layer_idx: int

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, index_B):
    c = self.config
    ln = lambda name: layers.LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name=name)
    a, cache = GPT2Attention(c, self.layer_idx, name="attn")(
      ln("ln_1")(x_BTD), positions_BT, mask_BTS, cache, index_B
    )
    x_BTD = x_BTD + a
    x_BTD = x_BTD + GPT2MLP(c, name="mlp")(ln("ln_2")(x_BTD))
    return x_BTD, cache


class GPT2(DecoderOnlyLM):
  """GPT-2 language model. `__call__` takes transformers' forward inputs."""

  config: GPT2Config

  def setup(self):
    c = self.config
    self.wte = layers.Embed(c.vocab_size, c.n_embd, c.initializer_range, c.dtype, c.param_dtype)
    self.wpe = param(
      self,
      "wpe",
      layers.normal_init(c.initializer_range),
      (c.n_positions, c.n_embd),
      ("positions", "embed"),
      c.param_dtype,
    )
    block = nn.remat(GPT2Block) if c.remat else GPT2Block
    self.blocks = [block(c, i) for i in range(c.n_layer)]
    self.ln_f = layers.LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)

  @property
  def max_positions(self) -> int:
    return self.config.n_positions

  def cache_shape(self) -> tuple[int, int, int]:
    c = self.config
    return c.n_layer, c.n_head, c.head_dim

  def scan_block(self) -> nn.Module | None:
    # Layer i's attention is scaled by 1 / (i + 1) under this option: the blocks differ.
    return (
      None
      if self.config.scale_attn_by_inverse_layer_idx
      else GPT2Block(self.config, 0, parent=None)
    )

  def embed(self, ids_BT: Array) -> Array:
    """Token embeddings (positions are added inside `hidden`)."""
    return self.wte(ids_BT)

  def add_positions(self, x_BTD: Array, positions_BT: Array) -> Array:
    return x_BTD + jnp.take(self.wpe, positions_BT, axis=0).astype(self.config.dtype)

  def final_layer_norm(self, x_BTD: Array) -> Array:
    return self.ln_f(x_BTD)

  def logits(self, h_BTD: Array) -> Array:
    return self.wte.attend(h_BTD)
