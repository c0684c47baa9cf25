"""Building blocks shared by the model families.

Conventions used throughout `l2s_jax.models`:
  B batch, T query length, S key length (cache slots), D model width,
  N query heads, K key/value heads, G = N // K query heads per kv head,
  H head width, F feed-forward width, V vocabulary.

Every parameter is created through `param`, which attaches logical axis
names (see `l2s_jax.sharding` for the rules that map them onto a mesh).
Kernels are stored input-major, e.g. a query projection is [D, N, H], so
the einsum strings in the modules read like the math.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2s_jax import quantize, sharding

Array = jax.Array

# A large negative number instead of -inf, so that a row with every key masked
# (a padding query) gives a uniform softmax rather than NaNs. Same choice as
# transformers (`torch.finfo(dtype).min`).
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def accum_dtype(dtype):
  """float32 for half-precision inputs; wider inputs keep their precision."""
  return jnp.promote_types(dtype, jnp.float32)


def param(
  module: nn.Module,
  name: str,
  init: Callable,
  shape: Sequence[int],
  axes: Sequence[str | None],
  dtype,
) -> Array:
  """Declares a parameter of `shape` with logical axis names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names {axes} for shape {shape}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal_init(stddev: float) -> Callable:
  return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
  """Scale-only RMS normalisation (T5's LayerNorm, Llama's RMSNorm).

  Statistics are accumulated in at least float32 whatever the compute dtype.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    scale = param(
      self, "scale", nn.initializers.ones, (x_BTD.shape[-1],), ("embed",), self.param_dtype
    )
    x32 = x_BTD.astype(accum_dtype(x_BTD.dtype))
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * y


class LayerNorm(nn.Module):
  """Mean-and-variance LayerNorm with scale and bias (GPT-2)."""

  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    d = x_BTD.shape[-1]
    scale = param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
    bias = param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
    x32 = x_BTD.astype(accum_dtype(x_BTD.dtype))
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * y + bias.astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` uses it as an output head."""

  vocab_size: int
  features: int
  init_std: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = param(
      self,
      "embedding",
      normal_init(self.init_std),
      (self.vocab_size, self.features),
      ("vocab", "embed"),
      self.param_dtype,
    )

  def __call__(self, ids_BT: Array) -> Array:
    if quantize.is_quantized(self.embedding):
      return quantize.take_rows(self.embedding, ids_BT).astype(self.dtype)
    return jnp.take(self.embedding, ids_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: Array) -> Array:
    """Logits against the table: "BTD,VD->BTV"."""
    b, t, d = x_BTD.shape
    e = self.embedding.astype(self.dtype)
    dot = quantize.dot_general if quantize.is_quantized(e) else jax.lax.dot_general
    return dot(x_BTD.reshape(b * t, d), e, (((1,), (1,)), ((), ()))).reshape(b, t, -1)


def project(x: Array, w: Array, n_in: int = 1) -> Array:
  """x [..., *I] @ w [*I, *O] -> [..., *O] as one 2-D matrix product.

  Mathematically an einsum such as "BTD,DNH->BTNH" (n_in=1) or
  "BTNH,NHD->BTD" (n_in=2). XLA:CPU lowers einsums that contract or emit
  several axes (or emit them in another order) into slow loops; a plain
  [rows, in] @ [in, out] product runs at memory speed, which is what
  batch-1 decoding is bound by. Reshapes of contiguous axes are free.
  `w` may be an int8 `qwix.QArray` (`decode.weights='int8'`, l2s_jax/quantize.py).
  """
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  lead = x.shape[: x.ndim - n_in]
  if tuple(x.shape[x.ndim - n_in :]) != tuple(in_shape):
    raise ValueError(f"cannot project {x.shape} with a {w.shape} kernel (n_in={n_in})")
  k = math.prod(in_shape)
  if quantize.is_quantized(w):
    y = quantize.dot_general(
      x.reshape(-1, k), w.reshape(k, math.prod(out_shape)), (((1,), (0,)), ((), ()))
    )
  else:
    # The input axes merged (free), the output axes kept: a kernel sharded on an output axis
    # that is not the first (GPT-2's fused [D, 3, N, H], heads over `tensor`) stays where it
    # lies; merged into one axis, its shards were no block of it and XLA gathered it whole.
    y = jax.lax.dot_general(
      x.reshape(-1, k), w.astype(x.dtype).reshape(k, *out_shape), (((1,), (0,)), ((), ()))
    )
  return y.reshape(*lead, *out_shape)


def gelu_new(x: Array) -> Array:
  """The tanh approximation of GELU (transformers' `gelu_new`)."""
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * jnp.power(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "relu": jax.nn.relu,
  "gelu_new": gelu_new,
  "gelu_pytorch_tanh": gelu_new,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def heads_first(x_BSKH: Array) -> Array:
  """[B, S, K, H] -> [B, K, S, H]: the layout of values in attention and caches."""
  return jnp.swapaxes(x_BSKH, 1, 2)


def keys_layout(x_BSKH: Array) -> Array:
  """[B, S, K, H] -> [B, K, H, S]: the layout of keys in attention and caches.

  With keys stored H-major, q.k^T and probs.v are both plain [M, K] @ [K, N]
  products per (B, K); XLA:CPU would otherwise transpose the whole key cache
  in every decoding step.
  """
  return jnp.transpose(x_BSKH, (0, 2, 3, 1))


# Queries per block when one call attends many (a long prompt's prefill, a full forward): the
# [B, K, G, T, S] logits and probabilities then live one block at a time, [.., QUERY_BLOCK, S],
# instead of for all T at once (GPT-2, batch 32, prompt 512 into a 1024-slot cache: 805 MB per
# array at once, 201 MB per block). Calls of at most 2 * QUERY_BLOCK queries (decoding steps,
# verify passes, short prompts) attend in one piece.
QUERY_BLOCK = 128


def attend(
  q_BTNH: Array,
  k_BKHS: Array,
  v_BKSH: Array,
  mask_BTS: Array | None,
  *,
  scale: float,
  bias_BNTS: Array | None = None,
) -> Array:
  """Scaled dot-product attention with grouped-query heads.

  Keys and values come in the caches' layouts (`keys_layout`, `heads_first`),
  so both products are batched over (B, K) with no transpose of the long S
  axis: in a decoding step only the one-token query and output move.

  Args:
    q_BTNH: queries. k_BKHS, v_BKSH: keys and values, K divides N.
    mask_BTS: True where query t may attend to key s (None: all).
    scale: multiplies the q.k logits (T5 uses 1, others 1/sqrt(H)).
    bias_BNTS: added to the logits before masking (T5's position bias);
      its leading dims may be 1.
  Returns:
    [B, T, N, H] in the dtype of `v`.
  """
  t = q_BTNH.shape[1]
  if t <= 2 * QUERY_BLOCK:
    return _attend(q_BTNH, k_BKHS, v_BKSH, mask_BTS, scale=scale, bias_BNTS=bias_BNTS)
  c = QUERY_BLOCK
  blocks = -(-t // c)

  def split(x, axis):  # [.., T, ..] -> [blocks, .., c, ..], padded past T
    x = jnp.pad(x, [(0, blocks * c - t) if a == axis else (0, 0) for a in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], blocks, c, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)

  xs = {"q": split(q_BTNH, 1)}
  if mask_BTS is not None:
    xs["mask"] = split(mask_BTS, 1)  # padded queries see nothing; dropped below
  per_query_bias = bias_BNTS is not None and bias_BNTS.shape[2] == t
  if per_query_bias:
    xs["bias"] = split(bias_BNTS, 2)

  def one(x):
    return _attend(
      x["q"],
      k_BKHS,
      v_BKSH,
      x.get("mask"),
      scale=scale,
      bias_BNTS=x["bias"] if per_query_bias else bias_BNTS,
    )

  # Under a gradient, each block's logits and probabilities are recomputed in the backward
  # pass (as flash attention does) rather than saved by the map for all T queries at once:
  # saved, they took 15.5 GiB of the Llama-3.1-8B train step's temporaries on v6e-8 (8192
  # tokens a chip).
  out = jax.lax.map(jax.checkpoint(one), xs)  # [blocks, B, c, N, H], one block at a time
  b, _, n, h = q_BTNH.shape
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * c, n, h)[:, :t]


def _attend(
  q_BTNH: Array,
  k_BKHS: Array,
  v_BKSH: Array,
  mask_BTS: Array | None,
  *,
  scale: float,
  bias_BNTS: Array | None = None,
) -> Array:
  """`attend` over all T queries at once."""
  b, t, n, h = q_BTNH.shape
  k = k_BKHS.shape[1]
  q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
  acc = accum_dtype(q_BTNH.dtype)
  logits = jnp.einsum("BKGTH,BKHS->BKGTS", q_BKGTH, k_BKHS).astype(acc) * scale
  if bias_BNTS is not None:
    bias = bias_BNTS.astype(acc)
    logits = logits + bias.reshape(bias.shape[0], k, n // k, *bias.shape[2:])
  if mask_BTS is not None:
    logits = jnp.where(mask_BTS[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BKSH.dtype)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v_BKSH)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# --- KV caches -------------------------------------------------------------
#
# A decoder's cache is a plain pytree:
#   {"index": int32[B], "layers": ({"k": [B, K, H, S], "v": [B, K, S, H]}, ...)}
# `index[b]` is the number of slots of row b that hold real tokens; slot s of
# row b holds the token at position s. Rows advance independently, so
# speculative decoding can keep a different number of tokens per row, and
# anything at slots >= index[b] is stale and never attended to.
# A prefill, whose rows all write from one slot, adds "start": int32[] (that slot) to
# the cache it extends (`with_start`); the extended cache comes back without it.


def with_start(cache, start) -> dict:
  """`cache` whose next write starts at slot `start` (a scalar) for every row."""
  b = cache["index"].shape[0]
  start = jnp.asarray(start, jnp.int32)
  return {**cache, "index": jnp.broadcast_to(start, (b,)), "start": start}


def write_index(cache) -> Array:
  """Where a block's layers write: the prefill's one slot (int32[]) or each row's [B]."""
  return cache.get("start", cache["index"])


def init_layer_cache(
  batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype
) -> dict[str, Array]:
  return {
    "k": jnp.zeros((batch, num_kv_heads, head_dim, max_len), dtype),
    "v": jnp.zeros((batch, num_kv_heads, max_len, head_dim), dtype),
  }


def cache_slots(layer_cache: dict[str, Array]) -> int:
  return layer_cache["v"].shape[2]


def update_layer_cache(
  cache: dict[str, Array], k_BKHT: Array, v_BKTH: Array, index_B: Array
) -> dict[str, Array]:
  """Writes T new keys/values of row b at slots index_B[b] .. index_B[b] + T - 1.

  One scatter per array, which XLA applies in place (a vmapped
  dynamic_update_slice, or a scatter that drops out-of-range slots, became a
  read-modify-write that copied the whole cache every step). Callers size caches so
  every slot written is in range: `model.cache_length`.

  `index_B` a scalar (int32[]): every row writes from that slot (`write_slice`). Otherwise
  two layouts of the same write, chosen by the batch:
  * B > 1: rows and slots are indexed on the 4-D arrays, the head axis a slice. The
    head axis stays whole, so a cache sharded over heads (tensor parallelism) is written
    where it lies; merging B and K into one axis would leave no sharding XLA can keep
    and it all-gathered every layer's cache at every step.
  * B = 1, the heads not split over `tensor` (one device, or rows and params over data
    or fsdp): the scatter runs on a [B*K, ...] view (a free reshape: the unit batch axis
    merged into the heads). Indexing rows of the 4-D array made XLA:CPU copy every cache
    array four times per step at batch 1, where the unit batch axis is bitcast away.
    With the heads split (the mesh the decoding front traces under says so), the merged
    axis made the compiler all-gather the new keys and values; the 4-D write is used.
  """
  if index_B.ndim == 0:
    return write_slice(cache, k_BKHT, v_BKTH, index_B)
  if v_BKTH.shape[0] > 1 or sharding.traced_mesh_splits(sharding.TENSOR):
    return write_rows(cache, k_BKHT, v_BKTH, index_B)
  return write_flat(cache, k_BKHT, v_BKTH, index_B)


def write_slice(cache, k_BKHT: Array, v_BKTH: Array, start: Array) -> dict[str, Array]:
  """`update_layer_cache` when every row writes from one slot `start` (a prefill): one
  dynamic_update_slice per array, a window of whole rows and heads, so it is written where
  it lies under any sharding of batch or heads. A scatter there, whose row indices the
  partitioner cannot match to the batch's shards, all-gathered its updates."""
  zero = jnp.zeros((), jnp.int32)
  k = jax.lax.dynamic_update_slice(
    cache["k"], k_BKHT.astype(cache["k"].dtype), (zero, zero, zero, start)
  )
  v = jax.lax.dynamic_update_slice(
    cache["v"], v_BKTH.astype(cache["v"].dtype), (zero, zero, start, zero)
  )
  return {"k": k, "v": v}


def write_rows(cache, k_BKHT: Array, v_BKTH: Array, index_B: Array) -> dict[str, Array]:
  """`update_layer_cache` on the 4-D arrays: rows and slots indexed, the head axis whole."""
  b, _, t, _ = v_BKTH.shape
  rows = jnp.arange(b)[:, None]  # [B, 1]
  slots = index_B[:, None] + jnp.arange(t)[None, :]  # [B, T]
  # Advanced indices separated by slices: the update is laid out [B, T, K, H].
  k = (
    cache["k"]
    .at[rows, :, :, slots]
    .set(jnp.transpose(k_BKHT, (0, 3, 1, 2)).astype(cache["k"].dtype), mode="promise_in_bounds")
  )
  v = (
    cache["v"]
    .at[rows, :, slots, :]
    .set(jnp.transpose(v_BKTH, (0, 2, 1, 3)).astype(cache["v"].dtype), mode="promise_in_bounds")
  )
  return {"k": k, "v": v}


def write_flat(cache, k_BKHT: Array, v_BKTH: Array, index_B: Array) -> dict[str, Array]:
  """`update_layer_cache` on a [B*K, ...] view of each array (a free reshape)."""
  b, heads, t, h = v_BKTH.shape
  s = cache_slots(cache)
  rows = jnp.arange(b * heads)[:, None]  # [BK, 1]
  slots = jnp.repeat(index_B, heads)[:, None] + jnp.arange(t)[None, :]  # [BK, T]
  # Advanced indices separated by a slice: the update is laid out [BK, T, H].
  k = (
    cache["k"]
    .reshape(b * heads, h, s)
    .at[rows, :, slots]
    .set(
      jnp.swapaxes(k_BKHT.reshape(b * heads, h, t), 1, 2).astype(cache["k"].dtype),
      mode="promise_in_bounds",
    )
  )
  v = (
    cache["v"]
    .reshape(b * heads, s, h)
    .at[rows, slots, :]
    .set(v_BKTH.reshape(b * heads, t, h).astype(cache["v"].dtype), mode="promise_in_bounds")
  )
  return {"k": k.reshape(b, heads, h, s), "v": v.reshape(b, heads, s, h)}


def extend_positions(index_B: Array, length: int) -> Array:
  """Positions [B, T] of `length` tokens appended at each row's index."""
  return index_B[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def cache_mask(positions_BT: Array, max_len: int) -> Array:
  """[B, T, S]: query at position p sees cache slots 0..p (causal)."""
  slots = jnp.arange(max_len, dtype=jnp.int32)
  return slots[None, None, :] <= positions_BT[:, :, None]


def full_causal_mask(attention_mask_BT: Array | None, batch: int, length: int) -> Array:
  """[B, T, T] mask of a full (uncached) causal forward with key padding."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  if attention_mask_BT is None:
    return jnp.broadcast_to(causal, (batch, length, length))
  return causal & attention_mask_BT.astype(bool)[:, None, :]


def padding_mask(attention_mask_BS: Array | None, batch: int, q_len: int, k_len: int) -> Array:
  """[B, T, S] bidirectional mask from key padding only."""
  if attention_mask_BS is None:
    return jnp.ones((batch, q_len, k_len), dtype=bool)
  return jnp.broadcast_to(attention_mask_BS.astype(bool)[:, None, :], (batch, q_len, k_len))
