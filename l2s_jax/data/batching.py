"""Examples -> token features -> padded batches (iterated by `l2s_jax.data.loader`).

Batches are dicts of numpy arrays, right-padded, of a fixed batch size:
  encoder-decoder SLM: inputs, inputs_mask [B, Lp]; targets, targets_mask [B, Lt]
  decoder-only SLM:    tokens, tokens_mask, loss_mask [B, L]; prompt_lengths [B]
  hybrid with its own LLM tokenizer: llm_inputs, llm_inputs_mask [B, Lm], and,
    when the tokenizers differ, overlap [B, Ls, Lm] (SLM position x LLM token)
  always: example_index int64 [B] (-1 for padding rows, whose masks are all 0)
Lengths are padded up to configured buckets, so a jitted step sees at most
(#prompt buckets x #target buckets) shapes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from l2s_jax.buckets import bucket_length
from l2s_jax.data.jsonl import DataError
from l2s_jax.data.tokenize import overlap_pairs

ENCODER_DECODER, DECODER_ONLY = "encoder_decoder", "decoder_only"


@dataclasses.dataclass
class Truncations:
  """Counts of texts cut to the length limits (reported, never silent)."""

  prompts: int = 0
  targets: int = 0
  llm_prompts: int = 0  # a hybrid's LLM-side prompts (its own tokenizer)

  def note(self, what: str, index: int, n: int, limit: int) -> None:
    count = getattr(self, what) + 1
    setattr(self, what, count)
    if count <= 3 or count % 1000 == 0:
      name = what.replace("_", " ")
      logging.warning(
        "example %d: %s of %d tokens truncated to %d (%d %s truncated so far)",
        index,
        name[:-1],
        n,
        limit,
        count,
        name,
      )


@dataclasses.dataclass(frozen=True)
class Featurizer:
  """Turns {"prompt", "target"} into the token features of one model kind."""

  slm_tokenizer: object
  kind: str  # ENCODER_DECODER | DECODER_ONLY
  max_prompt_len: int
  max_target_len: int
  llm_tokenizer: object | None = None  # set for a hybrid
  shared_tokenizer: bool = True
  truncations: Truncations = dataclasses.field(default_factory=Truncations)

  def __call__(self, example: dict, index: int) -> dict:
    prompt, target = example["prompt"], example["target"]
    if not prompt.strip():
      raise DataError(f"example {index}: empty prompt")
    if target is not None and not target.strip():
      raise DataError(f"example {index}: empty target")
    tok = self.slm_tokenizer
    p_ids, p_spans = tok.encode(prompt)
    t_ids = tok.encode(target)[0] if target is not None else []  # None: a prompt alone
    # Leave room for EOS (after the prompt for an encoder, after the target always).
    p_room = self.max_prompt_len - (1 if self.kind == ENCODER_DECODER else 0)
    if len(p_ids) > p_room:
      self.truncations.note("prompts", index, len(p_ids), p_room)
      p_ids, p_spans = p_ids[:p_room], p_spans[:p_room]
    if len(t_ids) > self.max_target_len - 1:
      self.truncations.note("targets", index, len(t_ids), self.max_target_len - 1)
      t_ids = t_ids[: self.max_target_len - 1]
    if not p_ids:
      raise DataError(f"example {index}: the prompt has no tokens")
    f = {"index": index}
    if self.kind == ENCODER_DECODER:
      f["inputs"] = p_ids + [tok.eos_id]
      f["targets"] = t_ids + [tok.eos_id]
    else:
      f["tokens"] = p_ids + t_ids + [tok.eos_id]
      f["prompt_length"] = len(p_ids)
    if self.llm_tokenizer is not None:
      if self.shared_tokenizer:
        f["llm_inputs"] = p_ids + [tok.eos_id]
      else:
        l_ids, l_spans = self.llm_tokenizer.encode(prompt)
        if len(l_ids) > self.max_prompt_len - 1:
          self.truncations.note("llm_prompts", index, len(l_ids), self.max_prompt_len - 1)
          l_ids, l_spans = l_ids[: self.max_prompt_len - 1], l_spans[: self.max_prompt_len - 1]
        f["llm_inputs"] = l_ids + [self.llm_tokenizer.eos_id]
        f["overlap"] = overlap_pairs(prompt, p_spans, l_spans)
    return f


@dataclasses.dataclass(frozen=True)
class Padder:
  """Stacks features into a batch of bucketed, right-padded arrays."""

  kind: str
  pad_id: int
  llm_pad_id: int
  prompt_buckets: Sequence[int]
  target_buckets: Sequence[int]
  hybrid: bool = False  # batches carry the LLM's own prompt ids
  overlaps: bool = False  # a hybrid whose two tokenizers differ

  def lengths(self, feats: list[dict]) -> dict[str, int]:
    """The longest sequence of each padded feature (0 when there are no rows)."""
    keys = ["inputs", "targets"] if self.kind == ENCODER_DECODER else ["tokens"]
    if self.hybrid:
      keys.append("llm_inputs")
    return {k: max((len(f[k]) for f in feats), default=0) for k in keys}

  def widen(self, batch: dict, lengths: dict[str, int]) -> dict:
    """`batch` padded on to the widths of `lengths` (the longest sequences of all processes'
    rows): what `self(feats, b, lengths)` gives, from the arrays a process built alone."""
    out = dict(batch)

    def grow(keys, buckets, length, pad_id, axis=1):
      width = bucket_length(max(length, 1), buckets)
      for key, value in zip(keys, (pad_id, 0, 0)):
        if key in out and out[key].shape[axis] < width:
          extra = [(0, 0)] * out[key].ndim
          extra[axis] = (0, width - out[key].shape[axis])
          out[key] = np.pad(out[key], extra, constant_values=value)

    if self.kind == ENCODER_DECODER:
      grow(("inputs", "inputs_mask"), self.prompt_buckets, lengths["inputs"], self.pad_id)
      grow(("targets", "targets_mask"), self.target_buckets, lengths["targets"], self.pad_id)
      rows = "inputs"
    else:
      grow(("tokens", "tokens_mask", "loss_mask"), self._totals(), lengths["tokens"], self.pad_id)
      rows = "tokens"
    if "llm_inputs" in lengths:
      grow(
        ("llm_inputs", "llm_inputs_mask"),
        self.prompt_buckets,
        lengths["llm_inputs"],
        self.llm_pad_id,
      )
    if self.overlaps:
      shape = (out[rows].shape[1], out["llm_inputs"].shape[1])
      ov = out["overlap"]
      out["overlap"] = np.pad(
        ov, [(0, 0), (0, shape[0] - ov.shape[1]), (0, shape[1] - ov.shape[2])]
      )
    return out

  def _totals(self) -> list[int]:
    return sorted({p + t for p in self.prompt_buckets for t in self.target_buckets})

  def __call__(
    self, feats: list[dict], batch_size: int, lengths: dict[str, int] | None = None
  ) -> dict:
    """lengths: the longest sequences to pad for (default: those of `feats`); several
    processes pass the maximum over all their rows, so their arrays line up."""
    b = batch_size
    lengths = self.lengths(feats) if lengths is None else lengths
    out = {"example_index": np.full((b,), -1, np.int64)}
    for r, f in enumerate(feats):
      out["example_index"][r] = f["index"]

    def pad(key, buckets, pad_id):
      width = bucket_length(max(lengths[key], 1), buckets)
      ids = np.full((b, width), pad_id, np.int32)
      mask = np.zeros((b, width), np.int32)
      for r, f in enumerate(feats):
        ids[r, : len(f[key])] = f[key]
        mask[r, : len(f[key])] = 1
      return ids, mask

    if self.kind == ENCODER_DECODER:
      out["inputs"], out["inputs_mask"] = pad("inputs", self.prompt_buckets, self.pad_id)
      out["targets"], out["targets_mask"] = pad("targets", self.target_buckets, self.pad_id)
    else:
      out["tokens"], out["tokens_mask"] = pad("tokens", self._totals(), self.pad_id)
      out["prompt_lengths"] = np.zeros((b,), np.int32)
      out["loss_mask"] = np.zeros_like(out["tokens_mask"])
      for r, f in enumerate(feats):
        out["prompt_lengths"][r] = f["prompt_length"]
        out["loss_mask"][r, f["prompt_length"] : len(f["tokens"])] = 1
    if "llm_inputs" in lengths:
      out["llm_inputs"], out["llm_inputs_mask"] = pad(
        "llm_inputs", self.prompt_buckets, self.llm_pad_id
      )
    if self.overlaps:
      rows = out["inputs" if self.kind == ENCODER_DECODER else "tokens"].shape[1]
      ov = np.zeros((b, rows, out["llm_inputs"].shape[1]), np.float32)
      for r, f in enumerate(feats):
        for i, j in f["overlap"]:
          ov[r, i, j] = 1.0
      out["overlap"] = ov
    return out
