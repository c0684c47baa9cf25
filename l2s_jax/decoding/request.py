"""A decoding request made ready for a compiled loop: the front's one preparation.

`decode` (`decoding/front.py`) takes prompts the way transformers does (host arrays, left- or
right-padded) and hands every method's jitted loop the same thing: prompts validated,
right-padded to a length bucket, fitted to every model's position limit, stop ids checked
against the vocabulary, each model's extra prefill inputs (e.g. a hybrid's LLM prompt)
beside them, and, given a mesh, the batch padded to a multiple of the data-parallel size and
split over the data axes (`l2s_jax.sharding.shard_batch`, the rule training uses too).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax import sharding
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS, prepare_prompts
from l2s_jax.decoding.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Request:
  input_ids: Any  # int32 [B', P] right-padded; B' = B padded for the mesh
  attention_mask: Any  # int32 [B', P]
  extra: tuple[dict, ...]  # per model: more inputs of its prefill, each [B', ...]
  cache_lens: tuple[int, ...]  # per model: cache slots for the prompt and the budget
  stop_ids: tuple[int, ...]
  vocab: int
  rows: int  # B, the caller's batch; outputs are cut back to it

  def finish(self, *arrays):
    """Outputs [B', ...] (global arrays on a mesh) as host arrays of the caller's B rows."""
    return tuple(None if a is None else sharding.to_host(a)[: self.rows] for a in arrays)


def model_vocab_size(model) -> int:
  c = model.config
  if hasattr(c, "vocab_size"):
    return int(c.vocab_size)
  return int(model.vocab_size)


def stop_id_list(eos_id, stop_ids, vocab: int) -> tuple[int, ...]:
  """The sorted, distinct ids that end a row (EOS and any others), checked against `vocab`."""
  ids = []
  if eos_id is not None:
    ids += [("eos_id", i) for i in (eos_id if isinstance(eos_id, (list, tuple)) else [eos_id])]
  ids += [("stop id", i) for i in stop_ids or ()]
  for kind, i in ids:
    if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= int(i) < vocab):
      raise ValueError(f"{kind} {i!r} is outside the vocabulary [0, {vocab})")
  ids = [i for _, i in ids]
  return tuple(sorted(set(int(i) for i in ids)))


def validate_generation_args(max_new_tokens: int, min_new_tokens: int, sampler: Sampler) -> None:
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(
      f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}"
    )
  if not isinstance(sampler, Sampler):
    raise ValueError(f"sampler must be an l2s_jax.decoding Sampler, got {sampler!r}")
  sampler.validate()


def cache_length(model, prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots a generation needs; checks the model's position limit."""
  needed = model.cache_length(prompt_len, max_new_tokens)
  limit = getattr(model, "max_positions", None)
  if limit is not None and needed > limit:
    raise ValueError(
      f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs "
      f"{needed} positions, but the model has only {limit}"
    )
  return needed


def fit_prompts(model, prompts, max_new_tokens: int):
  """(ids, mask, cache_len) of bucketed prompts, checked against the model's positions."""
  ids, mask = prompts.input_ids, prompts.attention_mask
  cache_length(model, int(prompts.lengths.max()), max_new_tokens)  # the prompts themselves fit
  limit = getattr(model, "max_positions", None)
  if limit is not None:
    # A bucket may be wider than the prompts; never let padding alone exceed the limit.
    fit = limit - model.cache_length(0, max_new_tokens)
    if ids.shape[1] > fit >= int(prompts.lengths.max()):
      ids, mask = ids[:, :fit], mask[:, :fit]
  return ids, mask, cache_length(model, ids.shape[1], max_new_tokens)


def prepare_request(
  models: Sequence,
  input_ids,
  attention_mask=None,
  *,
  budget: int,
  vocab: int,
  eos_id=None,
  stop_ids: Sequence[int] = (),
  pad_id: int = 0,
  prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
  extra_inputs: Sequence[dict | None] | None = None,
  mesh=None,
) -> Request:
  """Everything a decoder's jitted loop needs, for `models` reading the same prompts.

  budget: new positions each model's cache must hold past the prompt
    (max_new_tokens, plus the verify block for speculative decoding).
  vocab: the vocabulary the ids must fall in (the common one of several models).
  extra_inputs: one dict (or None) per model of [B, ...] arrays for its prefill.
  mesh: split the batch over the mesh's data axes; params are used as placed.
  """
  stops = stop_id_list(eos_id, stop_ids, vocab)
  prompts = prepare_prompts(
    input_ids, attention_mask, pad_id=pad_id, buckets=prompt_buckets, vocab_size=vocab
  )
  fitted = [fit_prompts(m, prompts, int(budget)) for m in models]
  ids, mask, _ = min(fitted, key=lambda f: f[0].shape[1])  # the narrowest fits every model
  cache_lens = tuple(cache_length(m, ids.shape[1], int(budget)) for m in models)
  extra_inputs = list(extra_inputs) if extra_inputs is not None else [None] * len(models)
  if len(extra_inputs) != len(models):
    raise ValueError(f"{len(extra_inputs)} extra-input dicts for {len(models)} models")
  rows = ids.shape[0]
  extras = []
  for i, e in enumerate(extra_inputs):
    e = {k: np.asarray(v) for k, v in (e or {}).items()}
    for k, v in e.items():
      if v.ndim == 0 or v.shape[0] != rows:
        raise ValueError(
          f"extra input {k!r} has shape {v.shape}; it needs the batch of {rows} rows first"
        )
    # Inputs indexed by prompt position (a hybrid's overlap rows) follow the ids' new layout.
    for k in getattr(models[i], "prompt_aligned_inputs", ()):
      if k in e:
        e[k] = prompts.relayout(e[k], ids.shape[1])
    extras.append(e)
  if mesh is not None:
    flat = {
      "input_ids": ids,
      "attention_mask": mask,
      **{(i, k): v for i, e in enumerate(extras) for k, v in e.items()},
    }
    flat, _ = sharding.shard_batch(mesh, flat)
    ids, mask = flat["input_ids"], flat["attention_mask"]
    extras = [{k: flat[(i, k)] for k in e} for i, e in enumerate(extras)]
  return Request(ids, mask, tuple(extras), cache_lens, stops, int(vocab), rows)


def abstract_request(
  models: Sequence,
  input_ids: jax.ShapeDtypeStruct,
  *,
  budget: int,
  vocab: int,
  eos_id=None,
  stop_ids: Sequence[int] = (),
  extra_inputs: Sequence[dict | None] | None = None,
  mesh=None,
) -> Request:
  """A request of prompts known by their shape alone ([B, P], already bucketed), for
  lowering a decoder ahead of time: the prompts and each model's extra inputs become
  ShapeDtypeStructs laid over the mesh's data axes as `prepare_request` would lay them.
  B must be a multiple of the data-parallel size; P must fit every model."""
  b, p = input_ids.shape
  if mesh is not None and b % sharding.data_parallel_size(mesh):
    raise ValueError(
      f"a batch of {b} rows does not split over the data-parallel size "
      f"{sharding.data_parallel_size(mesh)} (mesh {dict(mesh.shape)})"
    )
  stops = stop_id_list(eos_id, stop_ids, vocab)
  cache_lens = tuple(cache_length(m, p, int(budget)) for m in models)

  def abstract(shape, dtype):
    placed = sharding.batch_sharding(mesh, len(shape)) if mesh is not None else None
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=placed)

  extra_inputs = list(extra_inputs) if extra_inputs is not None else [None] * len(models)
  extras = tuple(
    {k: abstract(v.shape, v.dtype) for k, v in (e or {}).items()} for e in extra_inputs
  )
  ids = abstract((b, p), jnp.int32)
  return Request(ids, ids, extras, cache_lens, stops, int(vocab), b)
