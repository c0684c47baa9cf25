"""Autoregressive generation in one compiled `lax.while_loop`.

`decode_loop` is model-agnostic: it takes the logits of the first new token
and a step function `step_fn(carry, tokens [B]) -> (logits [B, V], carry)`,
so the bookkeeping is testable with a fake model and the collaborative
decoders reuse it with several models behind one step function.
`generate` binds it to an l2s_jax model through the prefill/extend protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.decoding.prompts import DEFAULT_BUCKETS
from l2s_jax.decoding.request import model_vocab_size, prepare_request, validate_generation_args
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


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
             sampler: Sampler = Greedy(), eos_id: int | Sequence[int] | None,
             rng: Array | None = None, min_new_tokens: int = 0,
             stop_ids: Sequence[int] = (), pad_id: int = 0,
             logits_processor: LogitsProcessor | None = None,
             prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
             return_logprobs: bool = False, extra_inputs: dict | None = None,
             mesh: jax.sharding.Mesh | None = None) -> GenerateOutput:
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
    mesh: split the batch over the mesh's data axes ("data", "fsdp"),
      padded to a multiple of their size; params are used as placed
      (replicated or sharded, e.g. by `l2s_jax.assemble`).
  Returns:
    GenerateOutput with tokens [B, max_new_tokens] (pad_id after each row's
    stop token), lengths [B] (stop token included) and optional logprobs.
  """
  validate_generation_args(max_new_tokens, min_new_tokens, sampler)
  req = prepare_request([model], input_ids, attention_mask, budget=max_new_tokens,
                        vocab=model_vocab_size(model), eos_id=eos_id, stop_ids=stop_ids,
                        pad_id=pad_id, prompt_buckets=prompt_buckets,
                        extra_inputs=[extra_inputs], mesh=mesh)
  out = _generate_jit(
      params, req.input_ids, req.attention_mask, jax.random.PRNGKey(0) if rng is None else rng,
      req.extra[0], model=model, sampler=sampler, max_new_tokens=int(max_new_tokens),
      cache_len=req.cache_lens[0], stop_ids=req.stop_ids, min_new_tokens=int(min_new_tokens),
      pad_id=int(pad_id), logits_processor=logits_processor,
      return_logprobs=bool(return_logprobs))
  return GenerateOutput(*req.finish(*out))

