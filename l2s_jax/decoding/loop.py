"""Autoregressive generation in one compiled `lax.while_loop`.

`decode_loop` is model-agnostic: it takes the logits of the first new token
and a step function `step_fn(carry, tokens [B]) -> (logits [B, V], carry)`,
so the bookkeeping is testable with a fake model and the collaborative
decoders reuse it with several models behind one step function.
`Sample` is the greedy / sampling method's spec for the decoding front
(`l2s_jax.decoding.decode`); `generate` is that front with `Sample`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from l2s_jax.decoding.front import decode
from l2s_jax.decoding.request import validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler
from l2s_jax.decoding.spec import Decoded, DecodeSpec, next_token_fn, prefill
from l2s_jax.decoding.state import DecodeState

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]
# logits_processor(logits [B, V], state) -> logits [B, V]
LogitsProcessor = Callable[[Array, DecodeState], Array]


def decode_loop(
  step_fn: StepFn,
  first_logits_BV: Array,
  carry: Any,
  rng: Array,
  *,
  max_new_tokens: int,
  sampler: Sampler,
  stop_ids: Sequence[int],
  min_new_tokens: int = 0,
  pad_id: int = 0,
  logits_processor: LogitsProcessor | None = None,
) -> DecodeState:
  """Chooses up to `max_new_tokens` tokens per row; stops early when all rows are done.

  Traceable (call it inside jit). Rows that are done keep running through the
  model (the batch moves together) but their tokens are `pad_id`.
  """
  b, v = first_logits_BV.shape
  if isinstance(stop_ids, jax.Array):  # traced [E], distinct (the front's)
    stop = stop_ids.astype(jnp.int32)
  else:
    stop = jnp.asarray(sorted(set(int(s) for s in stop_ids)), jnp.int32)
  state = DecodeState(
    step=jnp.zeros((), jnp.int32),
    tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
    logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
    lengths=jnp.zeros((b,), jnp.int32),
    done=jnp.zeros((b,), bool),
    logits=first_logits_BV.astype(jnp.float32),
    rng=rng,
    carry=carry,
  )

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
      s.logprobs, jnp.where(s.done, 0.0, logprob)[:, None], (0, s.step)
    )
    lengths = jnp.where(s.done, s.lengths, step)
    done = s.done | hit_stop
    # The model runs on every chosen token, the last one included (its logits
    # are never used). Skipping that step with lax.cond would make XLA copy
    # every cache array into the branch on every step.
    next_logits, carry = _as_f32(step_fn(s.carry, token))
    return DecodeState(
      step=step,
      tokens=tokens,
      logprobs=logprobs,
      lengths=lengths,
      done=done,
      logits=next_logits,
      rng=rng,
      carry=carry,
    )

  return jax.lax.while_loop(cond, body, state)


def _as_f32(out):
  logits, carry = out
  return logits.astype(jnp.float32), carry


def sample_loop(
  spec, step_fn, first_logits_BV, carry, rng, inputs, *, max_new_tokens, logits_processor=None
) -> DecodeState:
  """`decode_loop` with a spec's sampler and min_new_tokens and the request's stop and pad
  ids (`spec.Inputs`): the loop of Sample, Combined and Routed."""
  return decode_loop(
    step_fn,
    first_logits_BV,
    carry,
    rng,
    max_new_tokens=max_new_tokens,
    sampler=spec.sampler,
    stop_ids=inputs.stops_E,
    pad_id=inputs.pad_id,
    min_new_tokens=spec.min_new_tokens,
    logits_processor=logits_processor,
  )


@dataclasses.dataclass(frozen=True)
class Sample(DecodeSpec):
  """Greedy decoding and sampling: one model, one token per step (`decode_loop`).

  sampler: Greedy() (default), Temperature, TopK, TopP or a chain of them.
  min_new_tokens: stop ids are suppressed before this many tokens.
  logits_processor: f(logits [B, V], DecodeState) -> logits, applied before the sampler.
  return_logprobs: also return log p(token) under the processed logits.
  """

  sampler: Sampler = Greedy()
  min_new_tokens: int = 0
  logits_processor: LogitsProcessor | None = None
  return_logprobs: bool = False

  def validate(self, max_new_tokens: int) -> None:
    validate_generation_args(max_new_tokens, self.min_new_tokens, self.sampler)

  def run(self, models, params, inputs, rng, knobs, *, max_new_tokens, vocab):
    (first_logits,), (cache,) = prefill(models, params, inputs)
    step = next_token_fn(models[0], params[0])
    state = sample_loop(
      self,
      step,
      first_logits,
      cache,
      rng,
      inputs,
      max_new_tokens=max_new_tokens,
      logits_processor=self.logits_processor,
    )
    return {
      "tokens": state.tokens,
      "lengths": state.lengths,
      "logprobs": state.logprobs if self.return_logprobs else None,
    }

  def finish(self, out, rows) -> Decoded:
    return Decoded(out["tokens"], out["lengths"], {}, {}, {}, self, logprobs=out.get("logprobs"))


def generate(
  model,
  params,
  input_ids,
  attention_mask=None,
  *,
  sampler: Sampler = Greedy(),
  min_new_tokens: int = 0,
  logits_processor: LogitsProcessor | None = None,
  return_logprobs: bool = False,
  **request,
) -> Decoded:
  """`decode(Sample(sampler, ...), model, params, ...)`: up to `max_new_tokens` tokens after
  each prompt, for every model kind (T5, GPT2, Llama, the hybrid); greedy output equals
  transformers' greedy output. `logprobs` [B, N] is set when `return_logprobs`.
  Request arguments (max_new_tokens, eos_id, stop_ids, pad_id, rng, prompt_buckets,
  extra_inputs, mesh, ...) as `l2s_jax.decoding.decode`."""
  spec = Sample(sampler, min_new_tokens, logits_processor, bool(return_logprobs))
  return decode(spec, model, params, input_ids, attention_mask, **request)
