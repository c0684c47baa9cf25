"""T5 family: T5, T5 v1.1, Flan-T5, mT5 (encoder, decoder, encoder-decoder).

Semantics follow transformers' `modeling_t5.py` / `modeling_mt5.py`: RMS layer
norms without bias, unscaled dot-product attention with a learned relative
position bias (computed by the first layer of each stack and shared by all its
layers), ReLU or gated-GELU feed-forward, and, for the original T5, an output
head tied to the shared embedding with the decoder output scaled by
d_model**-0.5. T5 v1.1 / Flan-T5 / mT5 have gated-GELU, a head of their own and
no scaling (transformers' MT5 never scales, whatever its config says).

Param tree:
  shared/embedding [V, D]
  encoder/relative_attention_bias [R, N]
  encoder/layers_i/{self_attention/{q,k,v,o}, self_attention_norm, mlp, mlp_norm}
  encoder/final_norm
  decoder/... as encoder, plus cross_attention/{q,k,v,o}, cross_attention_norm
  lm_head [D, V]                    (only when the head is untied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from l2s_jax import sharding
from l2s_jax.models import layers
from l2s_jax.models.layers import Array, param

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  # "relu" (T5) or "gated-gelu" (v1.1, Flan-T5, mT5); "gated-<act>" generally.
  feed_forward_proj: str = "relu"
  # Original T5 ties the output head to `shared` and scales the decoder
  # output by d_model**-0.5; v1.1 has a separate head and no scaling.
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  model_type: str = "t5"  # "t5" or "mt5": how to save it back
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # storage dtype
  remat: bool = False  # recompute each layer's activations in the backward pass

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    act = self.feed_forward_proj.split("-")[-1]
    # transformers maps "gated-gelu" to the tanh approximation.
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


def _t5(d_model, d_kv, d_ff, layers_, heads, vocab=32128):
  return T5Config(
    vocab_size=vocab,
    d_model=d_model,
    d_kv=d_kv,
    d_ff=d_ff,
    num_layers=layers_,
    num_decoder_layers=layers_,
    num_heads=heads,
  )


def _v11(d_model, d_ff, layers_, heads, vocab=32128, model_type="t5"):
  return T5Config(
    vocab_size=vocab,
    d_model=d_model,
    d_kv=64,
    d_ff=d_ff,
    num_layers=layers_,
    num_decoder_layers=layers_,
    num_heads=heads,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    model_type=model_type,
  )


def _mt5(d_model, d_ff, layers_, heads):
  return _v11(d_model, d_ff, layers_, heads, vocab=250112, model_type="mt5")


PRESETS: dict[str, T5Config] = {
  "t5-small": _t5(512, 64, 2048, 6, 8),
  "t5-base": _t5(768, 64, 3072, 12, 12),
  "t5-large": _t5(1024, 64, 4096, 24, 16),
  "t5-3b": _t5(1024, 128, 16384, 24, 32),
  "t5-11b": _t5(1024, 128, 65536, 24, 128),
  "t5-v1_1-small": _v11(512, 1024, 8, 6),
  "t5-v1_1-base": _v11(768, 2048, 12, 12),
  "t5-v1_1-large": _v11(1024, 2816, 24, 16),
  "t5-v1_1-xl": _v11(2048, 5120, 24, 32),
  "t5-v1_1-xxl": _v11(4096, 10240, 24, 64),
  "flan-t5-small": _v11(512, 1024, 8, 6),
  "flan-t5-base": _v11(768, 2048, 12, 12),
  "flan-t5-large": _v11(1024, 2816, 24, 16),
  "flan-t5-xl": _v11(2048, 5120, 24, 32),
  "flan-t5-xxl": _v11(4096, 10240, 24, 64),
  "mt5-small": _mt5(512, 1024, 8, 6),
  "mt5-base": _mt5(768, 2048, 12, 12),
  "mt5-large": _mt5(1024, 2816, 24, 16),
  "mt5-xl": _mt5(2048, 5120, 24, 32),
  "mt5-xxl": _mt5(4096, 10240, 24, 64),
}


def relative_position_bucket(
  relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
  """Mesh-TensorFlow's bucketing of (key position - query position)."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # Guard log(0); the small branch is taken there anyway.
  safe = jnp.maximum(distance, 1).astype(jnp.float32)
  large = max_exact + (
    jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


class T5Attention(nn.Module):
  """Multi-head attention without the 1/sqrt(H) scaling (T5 folds it in)."""

  config: T5Config

  def setup(self):
    c = self.config
    d, n, h = c.d_model, c.num_heads, c.d_kv
    pd = c.param_dtype
    self.q = param(
      self, "q", layers.normal_init((d * h) ** -0.5), (d, n, h), ("embed", "heads", "head_dim"), pd
    )
    self.k = param(
      self, "k", layers.normal_init(d**-0.5), (d, n, h), ("embed", "heads", "head_dim"), pd
    )
    self.v = param(
      self, "v", layers.normal_init(d**-0.5), (d, n, h), ("embed", "heads", "head_dim"), pd
    )
    self.o = param(
      self, "o", layers.normal_init((n * h) ** -0.5), (n, h, d), ("heads", "head_dim", "embed"), pd
    )

  def project_kv(self, x_BSD: Array) -> tuple[Array, Array]:
    """Keys [B, K, H, S] and values [B, K, S, H], in the caches' layouts."""
    dt = self.config.dtype
    k = layers.project(x_BSD, self.k.astype(dt))  # BSD,DKH->BSKH
    v = layers.project(x_BSD, self.v.astype(dt))
    return layers.keys_layout(k), layers.heads_first(v)

  def __call__(
    self, x_BTD: Array, k_BKHS: Array, v_BKSH: Array, mask_BTS: Array, bias_BNTS: Array | None
  ) -> Array:
    dt = self.config.dtype
    q = layers.project(x_BTD, self.q.astype(dt))  # BTD,DNH->BTNH
    out = layers.attend(q, k_BKHS, v_BKSH, mask_BTS, scale=1.0, bias_BNTS=bias_BNTS)
    return layers.project(out, self.o.astype(dt), n_in=2)  # BTNH,NHD->BTD


class T5MLP(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    c = self.config
    d, f, dt, pd = c.d_model, c.d_ff, c.dtype, c.param_dtype
    act = layers.activation(c.activation)
    if c.is_gated:
      wi_0 = param(self, "wi_0", layers.normal_init(d**-0.5), (d, f), ("embed", "mlp"), pd)
      wi_1 = param(self, "wi_1", layers.normal_init(d**-0.5), (d, f), ("embed", "mlp"), pd)
      h = act(layers.project(x_BTD, wi_0.astype(dt))) * layers.project(x_BTD, wi_1.astype(dt))
    else:
      wi = param(self, "wi", layers.normal_init(d**-0.5), (d, f), ("embed", "mlp"), pd)
      h = act(layers.project(x_BTD, wi.astype(dt)))  # BTD,DF->BTF
    wo = param(self, "wo", layers.normal_init(f**-0.5), (f, d), ("mlp", "embed"), pd)
    return layers.project(h, wo.astype(dt))  # BTF,FD->BTD


class T5Layer(nn.Module):
  """One encoder block, or a decoder block when `is_decoder`."""

  config: T5Config
  is_decoder: bool

  def setup(self):
    c = self.config
    norm = lambda: layers.RMSNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)
    self.self_attention_norm = norm()
    self.self_attention = T5Attention(c)
    if self.is_decoder:
      self.cross_attention_norm = norm()
      self.cross_attention = T5Attention(c)
    self.mlp_norm = norm()
    self.mlp = T5MLP(c)

  def cross_kv(self, encoded_BMD: Array) -> dict[str, Array]:
    k, v = self.cross_attention.project_kv(encoded_BMD)
    return {"k": k, "v": v}

  def __call__(
    self,
    x_BTD: Array,
    *,
    self_mask_BTS: Array,
    bias_BNTS: Array,
    cache: dict[str, Array] | None = None,
    index_B: Array | None = None,
    cross: dict[str, Array] | None = None,
    cross_mask_BTM: Array | None = None,
  ):
    """Returns (output [B, T, D], updated layer cache or None)."""
    h = self.self_attention_norm(x_BTD)
    k, v = self.self_attention.project_kv(h)
    if cache is not None:
      cache = layers.update_layer_cache(cache, k, v, index_B)
      k, v = cache["k"], cache["v"]
    x_BTD = x_BTD + self.self_attention(h, k, v, self_mask_BTS, bias_BNTS)
    if self.is_decoder:
      h = self.cross_attention_norm(x_BTD)
      x_BTD = x_BTD + self.cross_attention(h, cross["k"], cross["v"], cross_mask_BTM, None)
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
    return x_BTD, cache


class T5Stack(nn.Module):
  """The encoder or the decoder stack; takes embeddings, returns final states."""

  config: T5Config
  is_decoder: bool

  def setup(self):
    c = self.config
    n_layers = c.num_decoder_layers if self.is_decoder else c.num_layers
    self.relative_attention_bias = param(
      self,
      "relative_attention_bias",
      layers.normal_init(c.d_model**-0.5),
      (c.relative_attention_num_buckets, c.num_heads),
      ("rel_buckets", "heads"),
      c.param_dtype,
    )
    layer = nn.remat(T5Layer) if c.remat else T5Layer
    self.layers = [layer(c, self.is_decoder) for _ in range(n_layers)]
    self.final_norm = layers.RMSNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)

  def position_bias(self, q_pos_BT: Array, k_pos_S: Array) -> Array:
    """[B, N, T, S] learned bias of each (query, key) position pair."""
    c = self.config
    rel = k_pos_S[None, None, :] - q_pos_BT[:, :, None]
    buckets = relative_position_bucket(
      rel,
      bidirectional=not self.is_decoder,
      num_buckets=c.relative_attention_num_buckets,
      max_distance=c.relative_attention_max_distance,
    )
    bias_BTSN = jnp.take(self.relative_attention_bias, buckets, axis=0)
    return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(c.dtype)

  def __call__(
    self,
    x_BTD: Array,
    mask_BTS: Array,
    *,
    q_pos_BT: Array,
    k_pos_S: Array,
    cache: Cache | None = None,
    cross: Cache | None = None,
  ) -> tuple[Array, Cache | None]:
    bias = self.position_bias(q_pos_BT, k_pos_S)
    cross_mask = None
    if cross is not None:
      b, t = x_BTD.shape[:2]
      cross_mask = layers.padding_mask(cross["mask"], b, t, cross["mask"].shape[1])
    new_layers = []
    for i, layer in enumerate(self.layers):
      x_BTD = sharding.constrain_rows(x_BTD)
      x_BTD, layer_cache = layer(
        x_BTD,
        self_mask_BTS=mask_BTS,
        bias_BNTS=bias,
        cache=None if cache is None else cache["layers"][i],
        index_B=None if cache is None else layers.write_index(cache),
        cross=None if cross is None else cross["layers"][i],
        cross_mask_BTM=cross_mask,
      )
      new_layers.append(layer_cache)
    x_BTD = self.final_norm(x_BTD)
    if cache is None:
      return x_BTD, None
    return x_BTD, {"index": cache["index"] + x_BTD.shape[1], "layers": tuple(new_layers)}

  def cross_kv(self, encoded_BMD: Array) -> tuple[dict[str, Array], ...]:
    return tuple(layer.cross_kv(encoded_BMD) for layer in self.layers)


class T5(nn.Module):
  """T5 encoder-decoder with a language-model head (T5ForConditionalGeneration).

  Also usable as an encoder alone (`encode`), which is what the hybrid model
  takes from a large T5.
  """

  config: T5Config
  encoder_only: bool = False

  def setup(self):
    c = self.config
    self.shared = layers.Embed(c.vocab_size, c.d_model, 1.0, c.dtype, c.param_dtype)
    self.encoder = T5Stack(c, is_decoder=False)
    if not self.encoder_only:
      self.decoder = T5Stack(c, is_decoder=True)
      if not c.tie_word_embeddings:
        self.lm_head = param(
          self,
          "lm_head",
          layers.normal_init(1.0),
          (c.d_model, c.vocab_size),
          ("embed", "vocab"),
          c.param_dtype,
        )

  # --- pieces --------------------------------------------------------------

  def embed(self, input_ids_BT: Array) -> Array:
    return self.shared(input_ids_BT)

  def encode(
    self,
    input_ids: Array | None,
    attention_mask: Array | None = None,
    inputs_embeds: Array | None = None,
  ) -> Array:
    """Encoder states [B, M, D]. Give `input_ids` [B, M] or `inputs_embeds`."""
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    b, m = x.shape[:2]
    pos = jnp.arange(m, dtype=jnp.int32)
    mask = layers.padding_mask(attention_mask, b, m, m)
    out, _ = self.encoder(x, mask, q_pos_BT=jnp.broadcast_to(pos, (b, m)), k_pos_S=pos)
    return out

  def logits(self, x_BTD: Array) -> Array:
    c = self.config
    if c.scale_decoder_outputs:
      x_BTD = x_BTD * (c.d_model**-0.5)
    if c.tie_word_embeddings:
      return self.shared.attend(x_BTD)
    return layers.project(x_BTD, self.lm_head.astype(c.dtype))  # BTD,DV->BTV

  def decode(
    self,
    decoder_input_ids: Array,
    encoded: Array,
    attention_mask: Array | None = None,
    decoder_attention_mask: Array | None = None,
  ) -> Array:
    """Full (uncached) decoder forward: logits [B, T, V]."""
    x = self.embed(decoder_input_ids)
    b, t = decoder_input_ids.shape
    pos = jnp.arange(t, dtype=jnp.int32)
    mask = layers.full_causal_mask(decoder_attention_mask, b, t)
    if attention_mask is None:
      attention_mask = jnp.ones(encoded.shape[:2], jnp.int32)
    cross = {"layers": self.decoder.cross_kv(encoded), "mask": attention_mask}
    out, _ = self.decoder(x, mask, q_pos_BT=jnp.broadcast_to(pos, (b, t)), k_pos_S=pos, cross=cross)
    return self.logits(out)

  def __call__(
    self,
    input_ids: Array | None,
    attention_mask: Array | None = None,
    decoder_input_ids: Array | None = None,
    decoder_attention_mask: Array | None = None,
    inputs_embeds: Array | None = None,
  ) -> Array:
    """Same inputs as transformers' T5ForConditionalGeneration; logits [B, T, V]."""
    if decoder_input_ids is None:
      raise ValueError("T5 needs decoder_input_ids (a causal LM takes only input_ids)")
    encoded = self.encode(input_ids, attention_mask, inputs_embeds)
    return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask)

  # --- incremental decoding -----------------------------------------------

  max_positions = None  # relative positions: no hard limit

  def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
    """Decoder slots: the start token plus every new token, each fed back once."""
    return max_new_tokens + 1

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """Empty decoder self-attention cache of `max_len` slots per row."""
    c = self.config
    dtype = dtype or c.dtype
    return {
      "index": jnp.zeros((batch,), jnp.int32),
      "layers": tuple(
        layers.init_layer_cache(batch, max_len, c.num_heads, c.d_kv, dtype)
        for _ in range(c.num_decoder_layers)
      ),
    }

  def prefill(
    self,
    input_ids: Array | None,
    attention_mask: Array,
    *,
    max_len: int,
    inputs_embeds: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Encodes the prompt once; returns (logits [B, V] of the first new token, cache).

    The cache holds the decoder's self-attention slots (`max_len` of them,
    the start token included) and, under "cross", the encoder keys/values.
    """
    encoded = self.encode(input_ids, attention_mask, inputs_embeds)
    return self.prefill_from_encoded(encoded, attention_mask, max_len=max_len)

  def prefill_from_encoded(
    self, encoded: Array, attention_mask: Array, *, max_len: int
  ) -> tuple[Array, Cache]:
    b = encoded.shape[0]
    cache = self.init_cache(b, max_len)
    cache["cross"] = {
      "layers": self.decoder.cross_kv(encoded),
      "mask": attention_mask.astype(jnp.int32),
    }
    start = jnp.full((b, 1), self.config.decoder_start_token_id, jnp.int32)
    logits, cache = self.extend(start, layers.with_start(cache, 0))
    return logits[:, -1], cache

  def extend(self, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
    """Appends `tokens_BT` at each row's cache index; logits [B, T, V]."""
    max_len = layers.cache_slots(cache["layers"][0])
    q_pos = layers.extend_positions(cache["index"], tokens_BT.shape[1])
    k_pos = jnp.arange(max_len, dtype=jnp.int32)
    mask = layers.cache_mask(q_pos, max_len)
    out, new = self.decoder(
      self.embed(tokens_BT), mask, q_pos_BT=q_pos, k_pos_S=k_pos, cache=cache, cross=cache["cross"]
    )
    new["cross"] = cache["cross"]
    return self.logits(out), new
