"""Shared vocabularies for models that decode together.

Collaborative decoding compares or mixes the models' distributions token id
by token id, so the models must share a tokenizer. Their output layers may
still differ in size: checkpoints pad the embedding matrix to a multiple of
64 or 128 (Qwen2-0.5B has 151936 rows, Qwen2-7B 152064, for one tokenizer of
151665 ids). Such sizes are aligned by cutting every model's logits to the
shortest (as FS-GEN's code does); the rows past the tokenizer are padding
that no real text uses.

A real mismatch (different tokenizers) is refused: the sizes must either be
equal or all cover the tokenizer (`tokenizer_size`), or, without it, differ
by at most `PADDING_SLACK` of the smallest (padding rows, not new tokens).
"""

from __future__ import annotations

from typing import Sequence

import jax

from l2s_jax.decoding.request import model_vocab_size

PADDING_SLACK = 0.01


def common_vocab(
  models: Sequence, tokenizer_size: int | None = None, names: Sequence[str] | None = None
) -> int:
  """The vocabulary size every model's logits are cut to; raises on a real mismatch."""
  sizes = [model_vocab_size(m) for m in models]
  names = list(names or [f"model {i}" for i in range(len(models))])
  desc = ", ".join(f"{n}: {s}" for n, s in zip(names, sizes))
  smallest = min(sizes)
  if tokenizer_size is not None:
    if tokenizer_size > smallest:
      raise ValueError(f"vocabularies do not cover the tokenizer's {tokenizer_size} ids ({desc})")
    return smallest
  if max(sizes) - smallest > PADDING_SLACK * smallest:
    raise ValueError(
      f"vocabulary sizes differ by more than padding ({desc}): collaborative decoding needs "
      f"one tokenizer shared by every model. If they do share one, pass tokenizer_size="
    )
  return smallest


def cut(logits_BV: jax.Array, vocab: int) -> jax.Array:
  return logits_BV[..., :vocab]
