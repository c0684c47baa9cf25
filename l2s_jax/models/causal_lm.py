"""The incremental-decoding protocol shared by decoder-only language models.

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

import jax.numpy as jnp

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

  def extend_hidden(self, tokens_BT: Array, cache: Cache,
                    inputs_embeds: Array | None = None) -> tuple[Array, Cache]:
    x = self.embed(tokens_BT) if inputs_embeds is None else inputs_embeds.astype(self.config.dtype)
    max_len = layers.cache_slots(cache["layers"][0])
    positions = layers.extend_positions(cache["index"], x.shape[1])
    mask = layers.cache_mask(positions, max_len)
    return self.hidden(x, positions, mask, cache)

  def extend(self, tokens_BT: Array, cache: Cache,
             inputs_embeds: Array | None = None) -> tuple[Array, Cache]:
    """Appends T tokens at each row's cache index; logits [B, T, V]."""
    h, cache = self.extend_hidden(tokens_BT, cache, inputs_embeds)
    return self.logits(h), cache

  def prefill(self, input_ids: Array, attention_mask: Array, *, max_len: int,
              inputs_embeds: Array | None = None) -> tuple[Array, Cache]:
    """Runs the right-padded prompt once; logits [B, V] at each row's last token.

    Slots past a row's length are written too but the cache index is set to
    the row's length, so they are overwritten by generated tokens and never
    attended to.
    """
    b = input_ids.shape[0]
    cache = self.init_cache(b, max_len)
    h, cache = self.extend_hidden(input_ids, cache, inputs_embeds)
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)
    cache = {**cache, "index": lengths}
    return self.logits(last)[:, 0], cache
