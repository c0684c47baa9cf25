"""Examples -> token features -> padded batches, and a resumable, sharded iterator.

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
from typing import Callable, Sequence

import numpy as np

from l2s_jax.data.jsonl import DataError
from l2s_jax.data.tokenize import overlap_pairs
from l2s_jax.decoding.prompts import bucket_length

ENCODER_DECODER, DECODER_ONLY = "encoder_decoder", "decoder_only"


@dataclasses.dataclass
class Truncations:
  """Counts of texts cut to the length limits (reported, never silent)."""
  prompts: int = 0
  targets: int = 0

  def note(self, what: str, index: int, n: int, limit: int) -> None:
    count = getattr(self, what) + 1
    setattr(self, what, count)
    if count <= 3 or count % 1000 == 0:
      logging.warning("example %d: %s of %d tokens truncated to %d (%d %s truncated so far)",
                      index, what[:-1], n, limit, count, what)


@dataclasses.dataclass(frozen=True)
class Featurizer:
  """Turns {"prompt", "target"} into the token features of one model kind."""
  slm_tokenizer: object
  kind: str                          # ENCODER_DECODER | DECODER_ONLY
  max_prompt_len: int
  max_target_len: int
  llm_tokenizer: object | None = None   # set for a hybrid
  shared_tokenizer: bool = True
  truncations: Truncations = dataclasses.field(default_factory=Truncations)

  def __call__(self, example: dict, index: int) -> dict:
    prompt, target = example["prompt"], example["target"]
    if not prompt.strip():
      raise DataError(f"example {index}: empty prompt")
    if not target.strip():
      raise DataError(f"example {index}: empty target")
    tok = self.slm_tokenizer
    p_ids, p_spans = tok.encode(prompt)
    t_ids, _ = tok.encode(target)
    # Leave room for EOS (after the prompt for an encoder, after the target always).
    p_room = self.max_prompt_len - (1 if self.kind == ENCODER_DECODER else 0)
    if len(p_ids) > p_room:
      self.truncations.note("prompts", index, len(p_ids), p_room)
      p_ids, p_spans = p_ids[:p_room], p_spans[:p_room]
    if len(t_ids) > self.max_target_len - 1:
      self.truncations.note("targets", index, len(t_ids), self.max_target_len - 1)
      t_ids = t_ids[:self.max_target_len - 1]
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
        l_ids, l_spans = l_ids[:self.max_prompt_len - 1], l_spans[:self.max_prompt_len - 1]
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

  def __call__(self, feats: list[dict], batch_size: int) -> dict:
    b = batch_size
    out = {"example_index": np.full((b,), -1, np.int64)}
    for r, f in enumerate(feats):
      out["example_index"][r] = f["index"]

    def pad(key, buckets, pad_id):
      width = bucket_length(max(len(f[key]) for f in feats), buckets)
      ids = np.full((b, width), pad_id, np.int32)
      mask = np.zeros((b, width), np.int32)
      for r, f in enumerate(feats):
        ids[r, :len(f[key])] = f[key]
        mask[r, :len(f[key])] = 1
      return ids, mask

    if self.kind == ENCODER_DECODER:
      out["inputs"], out["inputs_mask"] = pad("inputs", self.prompt_buckets, self.pad_id)
      out["targets"], out["targets_mask"] = pad("targets", self.target_buckets, self.pad_id)
    else:
      totals = sorted({p + t for p in self.prompt_buckets for t in self.target_buckets})
      out["tokens"], out["tokens_mask"] = pad("tokens", totals, self.pad_id)
      out["prompt_lengths"] = np.zeros((b,), np.int32)
      out["loss_mask"] = np.zeros_like(out["tokens_mask"])
      for r, f in enumerate(feats):
        out["prompt_lengths"][r] = f["prompt_length"]
        out["loss_mask"][r, f["prompt_length"]:len(f["tokens"])] = 1
    if "llm_inputs" in feats[0]:
      out["llm_inputs"], out["llm_inputs_mask"] = pad("llm_inputs", self.prompt_buckets,
                                                      self.llm_pad_id)
    if "overlap" in feats[0]:
      rows = out["inputs" if self.kind == ENCODER_DECODER else "tokens"].shape[1]
      ov = np.zeros((b, rows, out["llm_inputs"].shape[1]), np.float32)
      for r, f in enumerate(feats):
        for i, j in f["overlap"]:
          ov[r, i, j] = 1.0
      out["overlap"] = ov
    return out


class BatchIterator:
  """Deterministic batches of one split, resumable from `get_state()`.

  Epoch e visits the examples in the order of a permutation seeded by
  (seed, e) (or in index order without shuffling); process p of P takes
  positions p, p + P, p + 2P, ... of that order, so processes see disjoint
  examples that together cover the split. With `repeat`, batches run on
  across epochs; without it, the last batch is filled with padding rows
  (example_index -1) and iteration ends.
  """

  def __init__(self, source, featurize: Callable[[dict, int], dict],
               pad: Callable[[list[dict], int], dict], batch_size: int, *, seed: int = 0,
               shuffle: bool = True, repeat: bool = True, process_index: int = 0,
               process_count: int = 1, max_examples: int = 0):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.source, self.featurize, self.pad = source, featurize, pad
    self.batch_size, self.seed, self.shuffle, self.repeat = batch_size, seed, shuffle, repeat
    self.process_index, self.process_count = process_index, process_count
    self.size = len(source) if not max_examples else min(max_examples, len(source))
    if self.size == 0:
      raise DataError("the split holds no examples")
    self.epoch, self.position = 0, 0
    self._order_epoch, self._order = None, None

  def _shard(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      order = (np.random.default_rng([self.seed, epoch]).permutation(self.size)
               if self.shuffle else np.arange(self.size))
      self._order = order[self.process_index::self.process_count]
      self._order_epoch = epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    feats = []
    while len(feats) < self.batch_size:
      shard = self._shard(self.epoch)
      if self.position >= len(shard):
        if not self.repeat:
          break
        self.epoch, self.position = self.epoch + 1, 0
        continue
      index = int(shard[self.position])
      self.position += 1
      feats.append(self.featurize(self.source[index], index))
    if not feats:
      raise StopIteration
    return self.pad(feats, self.batch_size)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "process_index", "process_count"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(f"iterator state has {key}={state[key]}, this iterator "
                         f"{getattr(self, key)}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
