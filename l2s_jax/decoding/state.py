"""The state carried by the decoding while_loop."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class DecodeState:
  """Loop state of `decode_loop`; every field is an array or a pytree of them.

  step:      int32 []       tokens chosen so far (the next column to fill)
  tokens:    int32 [B, N]   chosen tokens, pad after each row's stop token
  logprobs:  f32 [B, N]     log p(token) under the model's (processed) logits
  lengths:   int32 [B]      tokens of each row, its stop token included
  done:      bool [B]       row has emitted a stop token
  logits:    f32 [B, V]     the model's logits for the next token
  rng:       PRNG key
  carry:     whatever the step function threads through (KV caches)
  """

  step: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array
  logits: jax.Array
  rng: jax.Array
  carry: Any
