"""Autoregressive generation in one compiled `lax.while_loop`.

`decode_loop` is model-agnostic: it takes the logits of the first new token
and a step function `step_fn(carry, tokens [B]) -> (logits [B, V], carry)`,
so the bookkeeping is testable with a fake model and the collaborative
decoders reuse it with several models behind one step function.
`generate` binds it to an l2s_jax model through the prefill/extend protocol.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.decoding.prompts import DEFAULT_BUCKETS, prepare_prompts
from l2s_jax.decoding.sampling import Greedy, Sampler
from l2s_jax.decoding.state import DecodeState

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]
# logits_processor(logits [B, V], state) -> logits [B, V]
LogitsProcessor = Callable[[Array, DecodeState], Array]


def decode_loop(step_fn: StepFn, first_logits_BV: Array, carry: Any, rng: Array, *,
                max_new_tokens: int, sampler: Sampler, stop_ids: Sequence[int],
                min_new_tokens: int = 0, pad_id: int = 0,
                logits_processor: LogitsProcessor | None = None) -> DecodeState:
  """Chooses up to `max_new_tokens` tokens per row; stops early when all rows are done.

  Traceable (call it inside jit). Rows that are done keep running through the
  model (the batch moves together) but their tokens are `pad_id`.
  """
  b, v = first_logits_BV.shape
  stop = jnp.asarray(sorted(set(int(s) for s in stop_ids)), jnp.int32)
  state = DecodeState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool),
      logits=first_logits_BV.astype(jnp.float32),
      rng=rng, carry=carry)

  def cond(s: DecodeState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    logits = s.logits
    if logits_processor is not None:
      logits = logits_processor(logits, s).astype(jnp.float32)
    if min_new_tokens > 0 and stop.size:
      too_early = s.step < min_new_tokens
      is_stop_id = jnp.zeros((v,), bool).at[stop].set(True)
      logits = jnp.where(too_early & is_stop_id[None, :], -jnp.inf, logits)
    # Greedy draws nothing: skip the split (on CPU each split is a small loop of its own).
    rng, key = (s.rng, s.rng) if sampler.greedy else jax.random.split(s.rng)
    token = jnp.where(s.done, pad_id, sampler.sample(key, logits))
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], 1)[:, 0]
    hit_stop = jnp.isin(token, stop) & ~s.done
    step = s.step + 1
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(
        s.logprobs, jnp.where(s.done, 0.0, logprob)[:, None], (0, s.step))
    lengths = jnp.where(s.done, s.lengths, step)
    done = s.done | hit_stop
    # The model runs on every chosen token, the last one included (its logits
    # are never used). Skipping that step with lax.cond would make XLA copy
    # every cache array into the branch on every step.
    next_logits, carry = _as_f32(step_fn(s.carry, token))
    return DecodeState(step=step, tokens=tokens, logprobs=logprobs, lengths=lengths,
                       done=done, logits=next_logits, rng=rng, carry=carry)

  return jax.lax.while_loop(cond, body, state)


def _as_f32(out):
  logits, carry = out
  return logits.astype(jnp.float32), carry


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  tokens: np.ndarray | Array         # int32 [B, max_new_tokens]
  lengths: np.ndarray | Array        # int32 [B]
  logprobs: np.ndarray | Array | None  # f32 [B, max_new_tokens] when asked for


def model_vocab_size(model) -> int:
  c = model.config
  if hasattr(c, "vocab_size"):
    return int(c.vocab_size)
  return int(model.vocab_size)


def _stop_ids(eos_id, stop_ids, vocab: int) -> tuple[int, ...]:
  ids = []
  if eos_id is not None:
    ids += list(eos_id) if isinstance(eos_id, (list, tuple)) else [eos_id]
  ids += list(stop_ids or ())
  for i in ids:
    if not (isinstance(i, (int, np.integer)) and 0 <= int(i) < vocab):
      raise ValueError(f"stop/eos id {i!r} is outside the vocabulary [0, {vocab})")
  return tuple(sorted(set(int(i) for i in ids)))


GENERATE_STATIC = ("model", "sampler", "max_new_tokens", "cache_len", "stop_ids",
                   "min_new_tokens", "pad_id", "logits_processor", "return_logprobs")


def generate_core(params, input_ids, attention_mask, rng, extra_inputs, *, model, sampler,
                  max_new_tokens, cache_len, stop_ids, min_new_tokens, pad_id,
                  logits_processor, return_logprobs):
  """The traceable part of `generate`: prompts already right-padded and bucketed.

  Returns (tokens [B, N], lengths [B], logprobs [B, N] or None).
  """
  variables = {"params": params}
  first_logits, cache = model.apply(variables, input_ids, attention_mask, max_len=cache_len,
                                    method=model.prefill, **extra_inputs)

  def step_fn(cache, token_B):
    logits, cache = model.apply(variables, token_B[:, None], cache, method=model.extend)
    return logits[:, -1], cache

  state = decode_loop(step_fn, first_logits, cache, rng, max_new_tokens=max_new_tokens,
                      sampler=sampler, stop_ids=stop_ids, min_new_tokens=min_new_tokens,
                      pad_id=pad_id, logits_processor=logits_processor)
  return state.tokens, state.lengths, (state.logprobs if return_logprobs else None)


_generate_jit = jax.jit(generate_core, static_argnames=GENERATE_STATIC)


def validate_generation_args(max_new_tokens: int, min_new_tokens: int, sampler: Sampler) -> None:
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if not 0 <= min_new_tokens <= max_new_tokens:
    raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], "
                     f"got {min_new_tokens}")
  if not isinstance(sampler, Sampler):
    raise ValueError(f"sampler must be an l2s_jax.decoding Sampler, got {sampler!r}")
  sampler.validate()


def cache_length(model, prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots a generation needs; checks the model's position limit."""
  needed = model.cache_length(prompt_len, max_new_tokens)
  limit = getattr(model, "max_positions", None)
  if limit is not None and needed > limit:
    raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens needs "
                     f"{needed} positions, but the model has only {limit}")
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


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
             sampler: Sampler = Greedy(), eos_id: int | Sequence[int] | None,
             rng: Array | None = None, min_new_tokens: int = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             logits_processor: LogitsProcessor | None = None,
             prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
             return_logprobs: bool = False, extra_inputs: dict | None = None,
             mesh: jax.sharding.Mesh | None = None, data_axis: str | tuple = "data",
             ) -> GenerateOutput:
  """Generates up to `max_new_tokens` tokens after each prompt.

  Args:
    model, params: an l2s_jax model (T5, GPT2, Llama, the hybrid) and its params.
    input_ids, attention_mask: [B, P] prompts, left- or right-padded.
    sampler: Greedy() (default), Temperature, TopK, TopP or a chain of them.
    eos_id: id(s) that end a row (emitted, then padding); None: never stop early.
    rng: PRNG key for sampling (default key 0).
    min_new_tokens: stop ids are suppressed before this many tokens.
    stop_ids: more ids that end a row.
    logits_processor: f(logits [B, V], DecodeState) -> logits, applied before
      the sampler (contrastive / proxy combinations use it).
    prompt_buckets: prompt lengths are padded up to one of these, so a jitted
      generate compiles once per bucket; None: no bucketing.
    return_logprobs: also return log p(token) under the processed logits.
    extra_inputs: more keyword inputs of `model.prefill` ([B, ...] arrays),
      e.g. the hybrid's LLM prompt.
    mesh, data_axis: shard the batch over this mesh axis; params are used
      as given (replicated or already sharded).
  Returns:
    GenerateOutput with tokens [B, max_new_tokens] (pad_id after each row's
    stop token), lengths [B] (stop token included) and optional logprobs.
  """
  validate_generation_args(max_new_tokens, min_new_tokens, sampler)
  vocab = model_vocab_size(model)
  stops = _stop_ids(eos_id, stop_ids, vocab)
  prompts = prepare_prompts(input_ids, attention_mask, pad_id=pad_id,
                            buckets=prompt_buckets, vocab_size=vocab)
  ids, mask, cache_len = fit_prompts(model, prompts, max_new_tokens)
  extra = {k: np.asarray(v) for k, v in (extra_inputs or {}).items()}
  batch = ids.shape[0]
  if mesh is not None:
    ids, mask, extra, batch = _shard_batch(mesh, data_axis, ids, mask, extra)
  tokens, lengths, logprobs = _generate_jit(
      params, ids, mask, jax.random.PRNGKey(0) if rng is None else rng, extra,
      model=model, sampler=sampler, max_new_tokens=int(max_new_tokens), cache_len=cache_len,
      stop_ids=stops, min_new_tokens=int(min_new_tokens), pad_id=int(pad_id),
      logits_processor=logits_processor, return_logprobs=bool(return_logprobs))
  n = input_ids.shape[0]
  return GenerateOutput(tokens[:n], lengths[:n], None if logprobs is None else logprobs[:n])


def _shard_batch(mesh, data_axis, ids, mask, extra):
  """Pads the batch to a multiple of the data-axis size and shards it."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  axes = data_axis if isinstance(data_axis, tuple) else (data_axis,)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  b = ids.shape[0]
  padded = -(-b // shards) * shards
  def pad(x):
    if padded == b:
      return x
    filler = np.repeat(x[:1], padded - b, axis=0)  # copies of row 0: valid prompts
    return np.concatenate([x, filler], axis=0)
  def put(x):
    spec = P(data_axis, *([None] * (x.ndim - 1)))
    return jax.device_put(pad(x), NamedSharding(mesh, spec))
  return put(ids), put(mask), {k: put(v) for k, v in extra.items()}, padded
