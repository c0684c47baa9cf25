"""Length buckets: a few static shapes for jitted functions, shared by data and decoding.

Batches and prompts are padded up to the smallest bucket that holds them, so a
jitted step or decoding loop compiles once per bucket, not once per length.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= length (multiples of the largest past the end)."""
  if not buckets:
    return length
  for b in sorted(buckets):
    if b >= length:
      return int(b)
  top = max(buckets)
  return int(-(-length // top) * top)
