"""Decoder-only language models written once, and the incremental-decoding protocol.

Every generative model in l2s_jax (decoder-only, T5, the hybrid) offers:
  init_cache(batch, max_len, dtype) -> cache
  prefill(input_ids, attention_mask, *, max_len, inputs_embeds=None)
      -> (logits [B, V] of the first new token, cache)
  extend(tokens [B, T], cache) -> (logits [B, T, V], cache)

`prefill` takes prompts *right-padded* (row b's tokens in slots 0..len_b-1);
`l2s_jax.decoding` converts other layouts before calling it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2s_jax import sharding
from l2s_jax.models import layers
from l2s_jax.models.layers import Array

Cache = dict[str, Any]


class CausalLMMixin:
  """Adds `prefill` / `extend` to a module that defines

  embed(ids [B, T]) -> [B, T, D]          token embeddings only
  hidden(x [B, T, D], positions [B, T], mask [B, T, S], cache) -> ([B, T, D], cache)
  logits(h [B, T, D]) -> [B, T, V]
  init_cache(batch, max_len, dtype) -> cache
  """

  def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
    """Cache slots for a prompt plus new tokens, each new token fed back once."""
    return prompt_len + max_new_tokens

  def extend_hidden(
    self,
    tokens_BT: Array,
    cache: Cache,
    inputs_embeds: Array | None = None,
    positions_BT: Array | None = None,
  ) -> tuple[Array, Cache]:
    """positions_BT: default, the slots the tokens are written to (cache index onwards)."""
    x = self.embed(tokens_BT) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    max_len = layers.cache_slots(cache["layers"][0])
    positions = (
      layers.extend_positions(cache["index"], x.shape[1]) if positions_BT is None else positions_BT
    )
    mask = layers.cache_mask(positions, max_len)
    return self.hidden(x, positions, mask, cache)

  def extend(
    self, tokens_BT: Array, cache: Cache, inputs_embeds: Array | None = None
  ) -> tuple[Array, Cache]:
    """Appends T tokens at each row's cache index; logits [B, T, V]."""
    h, cache = self.extend_hidden(tokens_BT, cache, inputs_embeds)
    return self.logits(h), cache

  def prefill_chunk_length(self, batch: int) -> int:
    """Positions per prefill chunk at this batch size (a family whose outputs depend
    on each call's length overrides this)."""
    return max(PREFILL_CHUNK_TOKENS // batch, PREFILL_MIN_CHUNK)

  def prefill(
    self,
    input_ids: Array,
    attention_mask: Array,
    *,
    max_len: int,
    inputs_embeds: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Runs the right-padded prompt once; logits [B, V] at each row's last token.

    Slots past a row's length are written too but the cache index is set to
    the row's length, so they are overwritten by generated tokens and never
    attended to. They run at their row's last position, so that the largest
    position of the call is the longest prompt's, not the (bucketed) width:
    a rotary embedding that depends on the sequence length (dynamic NTK)
    then sees what transformers' `generate` sees.

    A prompt of more than `prefill_chunk_length(B)` positions runs in chunks of
    that many (`_prefill_in_chunks`), so the activations alive beside the cache
    are a chunk's, not the whole prompt's.
    """
    b, t = input_ids.shape[:2] if inputs_embeds is None else inputs_embeds.shape[:2]
    cache = self.init_cache(b, max_len)
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    last_B = jnp.maximum(lengths - 1, 0)
    positions = jnp.minimum(jnp.arange(t, dtype=jnp.int32)[None, :], last_B[:, None])
    chunk = self.prefill_chunk_length(b)
    if t > chunk:
      last, cache = _prefill_in_chunks(
        self, input_ids, inputs_embeds, positions, last_B, cache, chunk
      )
    else:
      h, cache = self.extend_hidden(
        input_ids, layers.with_start(cache, 0), inputs_embeds, positions
      )
      last = jnp.take_along_axis(h, last_B[:, None, None], axis=1)[:, 0]
    cache = {**cache, "index": lengths}
    return self.logits(last[:, None])[:, 0], cache


# A prefill runs at most this many tokens (batch x positions) per call of the
# blocks: the feed-forward and attention activations of a 512-token prompt at
# batch 32 (GPT-2: ~1.8 GB in float32) otherwise sit beside the KV cache.
# Chunks of fewer positions than PREFILL_MIN_CHUNK make the products too thin.
PREFILL_CHUNK_TOKENS = 4096
PREFILL_MIN_CHUNK = 64


def _prefill_in_chunks(module, input_ids, inputs_embeds, positions_BT, last_B, cache, chunk):
  """The prompt's T positions as chunks of at most `chunk`, one scanned call of the blocks each.

  The chunks are balanced: N = ceil(T / chunk) of them, ceil(T / N) positions each (130
  positions at most 128 a chunk run as 2 x 65, not 128 + 128). Chunk i covers
  [start_i, start_i + width): starts 0, width, 2 width, ... and, when width does not
  divide T, a last chunk ending at T that overlaps the one before it by fewer than N
  positions. The overlapped tokens are run again over the same prefix and write the same
  keys and values to the same slots, so every chunk has one shape and the cache never
  receives a slot past T. Returns (hidden [B, D] at each row's last token, cache).
  """
  b, t = positions_BT.shape
  chunk = -(-t // -(-t // chunk))
  starts = list(range(0, t - chunk + 1, chunk))
  if starts[-1] + chunk < t:
    starts.append(t - chunk)
  starts_N = jnp.asarray(starts, jnp.int32)
  windows_NC = starts_N[:, None] + jnp.arange(chunk, dtype=jnp.int32)[None, :]

  def gather(x_BT):  # [B, T, ...] -> [N, B, C, ...]
    return jnp.moveaxis(jnp.take(x_BT, windows_NC, axis=1), 1, 0)

  xs = {"start": starts_N, "positions": gather(positions_BT)}
  xs["tokens" if inputs_embeds is None else "embeds"] = gather(
    input_ids if inputs_embeds is None else inputs_embeds
  )

  def body(mdl, cache, x):
    cache = layers.with_start(cache, x["start"])
    h_BCD, cache = mdl.extend_hidden(x.get("tokens"), cache, x.get("embeds"), x["positions"])
    offset_B = last_B - x["start"]
    h_BD = jnp.take_along_axis(h_BCD, jnp.clip(offset_B, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
    return cache, h_BD

  scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
  cache, h_NBD = scan(module, cache, xs)
  # The chunk holding each row's last token: position p is in chunk p // width, except
  # that positions from (N - 1) width on are in the last one (which starts at T - width).
  chunk_B = jnp.minimum(last_B // chunk, len(starts) - 1)
  last = jnp.take_along_axis(h_NBD, chunk_B[None, :, None], axis=0)[0]
  return last, cache


class DecoderOnlyLM(nn.Module, CausalLMMixin):
  """What GPT-2 and Llama/Qwen2 share: blocks over a residual stream, a final norm, the
  full forward and the KV cache. A family defines, in `setup`, `blocks` and its final
  norm, and the hooks below.

    embed(ids [B, T]) -> [B, T, D]        token embeddings
    add_positions(x, positions) -> x      absolute position embeddings (GPT-2); identity
    final_layer_norm(x) -> x              the norm after the last block
    logits(h [B, T, D]) -> [B, T, V]
    cache_shape() -> (layers, kv heads, head dim); max_positions (None: no limit)
    scan_block() -> an unbound block every layer's params fit (None: none), for the
                    scanned layers of a rematerialized full forward
  """

  config: Any

  def add_positions(self, x_BTD: Array, positions_BT: Array) -> Array:
    return x_BTD

  def scan_block(self) -> nn.Module | None:
    """One unbound block that every layer's params fit (None: the layers differ), for
    `_scanned_blocks`. The block must cast each float param of two or more axes to the
    compute dtype before using it: the stack holds them in that dtype already."""
    return None

  def hidden(
    self, x_BTD: Array, positions_BT: Array, mask_BTS: Array, cache: Cache | None
  ) -> tuple[Array, Cache | None]:
    x_BTD = self.add_positions(x_BTD, positions_BT)
    block = self.scan_block() if cache is None and self.config.remat else None
    if block is not None and not self.is_initializing() and len(self.blocks) > 1:
      return self.final_layer_norm(self._scanned_blocks(block, x_BTD, positions_BT, mask_BTS)), None
    new_layers = []
    for i, block in enumerate(self.blocks):
      x_BTD = sharding.constrain_rows(x_BTD)
      x_BTD, layer_cache = block(
        x_BTD,
        positions_BT,
        mask_BTS,
        None if cache is None else cache["layers"][i],
        None if cache is None else layers.write_index(cache),
      )
      new_layers.append(layer_cache)
    x_BTD = self.final_layer_norm(x_BTD)
    if cache is None:
      return x_BTD, None
    return x_BTD, {"index": cache["index"] + x_BTD.shape[1], "layers": tuple(new_layers)}

  def _scanned_blocks(self, block: nn.Module, x_BTD, positions_BT, mask_BTS) -> Array:
    """The blocks of a rematerialized full forward (training) as one `lax.scan` over the
    layers' stacked params, each iteration under `jax.checkpoint`.

    A Python loop of `nn.remat` blocks leaves XLA free to schedule every layer's
    recomputation (and keep its gathered weights and activations) early in the backward
    pass: the Llama-3.1-8B train step on v6e-8 (fsdp 8, 8192 tokens a chip) needed 1.29 GiB
    of temporaries more per layer. In a scan the backward pass is a loop too, so one layer
    is recomputed, gathered and differentiated at a time. Float params of two or more axes
    (the matrices, and heads' biases) are stacked in the compute dtype, as the block would
    cast them; norms' scales and other vectors keep theirs. The stack (and its cotangent)
    is a copy of the layers' params for the step: in bf16, half their float32 size.
    """
    dt = self.config.dtype
    params = self.variables["params"]
    per_layer = [params[f"blocks_{i}"] for i in range(len(self.blocks))]
    cast = lambda p: p.astype(dt) if p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating) else p
    stacked = jax.tree.map(lambda *ps: jnp.stack([cast(p) for p in ps]), *per_layer)

    @jax.checkpoint
    def one(x, layer_params):
      x = sharding.constrain_rows(x)
      y, _ = block.apply({"params": layer_params}, x, positions_BT, mask_BTS, None, None)
      return y, None

    x_BTD, _ = jax.lax.scan(one, x_BTD, stacked)
    return x_BTD

  def __call__(
    self,
    input_ids: Array | None,
    attention_mask: Array | None = None,
    position_ids: Array | None = None,
    inputs_embeds: Array | None = None,
  ) -> Array:
    """Full forward; logits [B, T, V]. Positions default to 0..T-1 as in transformers."""
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    b, t = x.shape[:2]
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = self.hidden(x, position_ids, layers.full_causal_mask(attention_mask, b, t), None)
    return self.logits(h)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """{index [B], layers: per layer {k, v}} for `max_len` positions."""
    limit = self.max_positions
    if limit is not None and max_len > limit:
      raise ValueError(f"cache of {max_len} positions exceeds the model's {limit} positions")
    num_layers, heads, head_dim = self.cache_shape()
    return {
      "index": jnp.zeros((batch,), jnp.int32),
      "layers": tuple(
        layers.init_layer_cache(batch, max_len, heads, head_dim, dtype or self.config.dtype)
        for _ in range(num_layers)
      ),
    }
