"""Prompt layout and validation, on the host, before anything is compiled.

Users pass prompts the way transformers does (left- or right-padded, with an
attention mask). The models' `prefill` wants them right-padded (row b's
tokens in slots 0..len_b-1), and jitted functions want a few static shapes,
so prompts are moved to the left edge and padded up to a length bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from l2s_jax.buckets import DEFAULT_BUCKETS, bucket_length


@dataclasses.dataclass(frozen=True)
class Prompts:
  input_ids: np.ndarray  # int32 [B, P], right-padded with pad_id
  attention_mask: np.ndarray  # int32 [B, P]
  lengths: np.ndarray  # int32 [B]
  starts: np.ndarray  # int32 [B]: where row b's tokens began in the caller's layout

  def relayout(self, x_BP, width: int) -> np.ndarray:
    """x [B, P, ...] aligned with the caller's prompt positions, moved as the ids were:
    row b's slots starts[b] .. starts[b] + lengths[b] - 1 to 0 .., zeros elsewhere; width
    `width` on axis 1."""
    x_BP = np.asarray(x_BP)
    out = np.zeros((x_BP.shape[0], width) + x_BP.shape[2:], x_BP.dtype)
    for row, (s, n) in enumerate(zip(self.starts, self.lengths)):
      n = min(int(n), width, x_BP.shape[1] - int(s))
      out[row, :n] = x_BP[row, s : s + n]
    return out


def prepare_prompts(
  input_ids,
  attention_mask=None,
  *,
  pad_id: int = 0,
  buckets: Sequence[int] | None = DEFAULT_BUCKETS,
  vocab_size: int | None = None,
) -> Prompts:
  """Validates prompts and returns them right-padded to a bucketed length.

  Raises ValueError for an empty prompt, a mask that is not one contiguous
  run of ones per row, or ids outside the vocabulary.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be integers, got {ids.dtype}")
  b, p = ids.shape
  if b == 0:
    raise ValueError("empty batch")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  mask = (mask != 0).astype(np.int32)
  lengths = mask.sum(axis=1).astype(np.int32)
  empty = np.flatnonzero(lengths == 0)
  if empty.size:
    raise ValueError(f"empty prompt in row(s) {empty.tolist()}: every row needs at least one token")
  starts = np.argmax(mask, axis=1)
  runs = np.arange(p)[None, :]
  contiguous = ((runs >= starts[:, None]) & (runs < (starts + lengths)[:, None])).astype(np.int32)
  bad = np.flatnonzero((contiguous != mask).any(axis=1))
  if bad.size:
    raise ValueError(f"attention_mask rows {bad.tolist()} are not one contiguous run of ones")
  if vocab_size is not None:
    real = ids[mask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
      raise ValueError(
        f"input_ids hold id(s) outside the vocabulary [0, {vocab_size}): "
        f"min {real.min()}, max {real.max()}"
      )
  width = bucket_length(int(lengths.max()), buckets)
  out = np.full((b, width), pad_id, dtype=np.int32)
  out_mask = np.zeros((b, width), dtype=np.int32)
  for row in range(b):
    n = lengths[row]
    out[row, :n] = ids[row, starts[row] : starts[row] + n]
    out_mask[row, :n] = 1
  return Prompts(out, out_mask, lengths, starts.astype(np.int32))
