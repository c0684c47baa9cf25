"""Tokenizers (transformers' fast ones, or bytes) and the SLM x LLM token overlap matrix."""

from __future__ import annotations

import json
import os

import numpy as np

from l2s_jax.data.jsonl import DataError

Spans = list[tuple[int, int]]


class TextTokenizer:
  """A transformers tokenizer seen through the few calls the pipeline needs.

  encode() returns ids *without* special tokens, with character spans; the
  pipeline appends EOS itself where a model wants it. A tokenizer without a
  `tokenizers` backend (a "slow", pure-Python one) has no character offsets:
  it serves a model alone, but not the pooling between two tokenizers
  (`has_offsets` False, its spans empty).
  """

  def __init__(self, hf_tokenizer, name: str):
    self.hf = hf_tokenizer
    self.name = name
    self.has_offsets = bool(getattr(hf_tokenizer, "is_fast", False))
    eos = hf_tokenizer.eos_token_id
    if eos is None:
      raise DataError(f"tokenizer {name!r} has no EOS token")
    self.eos_id = int(eos)
    pad = hf_tokenizer.pad_token_id
    self.pad_id = int(pad) if pad is not None else self.eos_id
    self.vocab_size = len(hf_tokenizer)

  def encode(self, text: str) -> tuple[list[int], Spans]:
    if not self.has_offsets:
      ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
      return ids, [(0, 0)] * len(ids)
    enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

  def decode(self, ids) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

  def identity(self) -> str:
    """What makes two tokenizers the same: their full vocabulary and model."""
    if self.has_offsets:
      return self.hf.backend_tokenizer.to_str()
    return json.dumps([type(self.hf).__name__, sorted(self.hf.get_vocab().items())])


class ByteTokenizer:
  """ByT5's byte-level scheme without any file: id = byte + 3; pad 0, eos 1, unk 2."""

  name = "byt5"
  has_offsets = True
  pad_id, eos_id, offset = 0, 1, 3
  vocab_size = 256 + 3

  def encode(self, text: str) -> tuple[list[int], Spans]:
    ids, spans = [], []
    for i, ch in enumerate(text):
      for b in ch.encode("utf-8"):
        ids.append(b + self.offset)
        spans.append((i, i + 1))  # every byte of a character spans that character
    return ids, spans

  def decode(self, ids) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="ignore")

  def identity(self) -> str:
    return "byt5"


def load_tokenizer(spec: str):
  """A tokenizer from "byt5" or a local directory holding a fast tokenizer."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (heavy: loads torch)

  if spec == "byt5":
    return ByteTokenizer()
  if not os.path.isdir(spec):
    raise DataError(f"tokenizer directory {spec!r} does not exist")
  try:
    hf = AutoTokenizer.from_pretrained(spec, use_fast=True)
  except Exception as e:  # transformers raises many kinds here
    raise DataError(f"cannot load a tokenizer from {spec!r}: {e}") from e
  return TextTokenizer(hf, spec)


def same_tokenizer(a, b) -> bool:
  return a is b or a.identity() == b.identity()


def _trim(text: str, span: tuple[int, int]) -> tuple[int, int]:
  """The span without leading/trailing whitespace (empty if all whitespace)."""
  s, e = span
  while s < e and text[s].isspace():
    s += 1
  while e > s and text[e - 1].isspace():
    e -= 1
  return s, e


def overlap_pairs(text: str, slm_spans: Spans, llm_spans: Spans) -> list[tuple[int, int]]:
  """(i, j) for every SLM token i and LLM token j whose character spans overlap.

  Spans are compared on non-whitespace characters only, so a token's leading
  space (GPT-2's "Ġ", sentencepiece's "▁") never links it to its neighbour;
  empty spans (special tokens) overlap nothing.
  """
  a = [_trim(text, s) for s in slm_spans]
  b = [_trim(text, s) for s in llm_spans]
  pairs = []
  for i, (s1, e1) in enumerate(a):
    if s1 >= e1:
      continue
    for j in range(len(b)):
      s2, e2 = b[j]
      if s2 < e2 and s1 < e2 and s2 < e1:
        pairs.append((i, j))
  return pairs


def overlap_matrix(text: str, slm_spans: Spans, llm_spans: Spans, shape=None) -> np.ndarray:
  """Dense 0/1 float32 matrix [n_slm, n_llm] (or `shape`) of `overlap_pairs`."""
  shape = shape or (len(slm_spans), len(llm_spans))
  out = np.zeros(shape, np.float32)
  for i, j in overlap_pairs(text, slm_spans, llm_spans):
    if i < shape[0] and j < shape[1]:
      out[i, j] = 1.0
  return out
