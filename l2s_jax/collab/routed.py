"""Routed decoding that saves the LLM's compute (FS-GEN's routed intervention, BiLD's fallback).

The SLM generates; after each token a router reads the SLM's next-token distribution and
decides, per row, whether the LLM chooses the next token instead. The LLM runs only then:

  * it has read the prompt at prefill, and afterwards only what it was shown; the tokens
    chosen since its last call wait in a per-row buffer (`pending`, ragged: rows differ);
  * when any row's router fires, the LLM first reads every row's pending tokens, in chunks
    of `chunk` tokens through its KV cache (one extend of [B, chunk] per chunk, each row's
    cache index moved by its own count; slots past a row's index are stale and overwritten
    later), which gives its distribution for the next token of every row;
  * rows whose router fired take the LLM's token, the others the SLM's.

With no row firing the inner loop runs zero chunks: the LLM costs nothing that step (a
`while_loop` of zero trips, not a `cond`, so no cache is copied into a branch). A batch runs
the LLM when any row fires; the trace's `large_used` is the per-row decision, `batch_calls`
the steps at which the LLM ran. A router that always fires gives the LLM's own greedy output
(one pending token per call), one that never fires the SLM's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from l2s_jax.collab.combine import Router, collab_stats, collab_summary, log_probs
from l2s_jax.decoding.front import decode
from l2s_jax.decoding.loop import sample_loop
from l2s_jax.decoding.request import validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler, argmax
from l2s_jax.decoding.spec import Decoded, DecodeSpec, SpecError, extend, prefill

Array = jax.Array


def catch_up(
  llm,
  params,
  cache,
  pending_BP: Array,
  n_pending_B: Array,
  llm_logp_BV: Array,
  *,
  chunk: int,
  vocab: int,
  run: Array | bool = True,
):
  """The LLM reads each row's first n_pending_B[b] tokens of pending_BP, `chunk` at a time.

  Returns (cache, llm_logp [B, V]: its log-probs of the next token after each row's last
  pending token; rows with nothing pending keep `llm_logp_BV`, chunks run). `run` False:
  zero chunks (nothing read, nothing changes). Traceable."""
  b, p = pending_BP.shape
  longest = jnp.max(n_pending_B)
  chunks = jnp.where(run, (longest + chunk - 1) // chunk, 0)
  padded = jnp.pad(pending_BP, ((0, 0), (0, chunk)))  # a last chunk may read past P

  def body(s):
    j, cache, logp = s
    block = jax.lax.dynamic_slice(padded, (0, j * chunk), (b, chunk))
    count = jnp.clip(n_pending_B - j * chunk, 0, chunk)
    start = cache["index"]
    logits, cache = extend(llm, params, block, cache)
    cache = {**cache, "index": start + count}
    last = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    new = log_probs(last, vocab)
    return j + 1, cache, jnp.where((count > 0)[:, None], new, logp)

  _, cache, logp = jax.lax.while_loop(
    lambda s: s[0] < chunks, body, (jnp.zeros((), jnp.int32), cache, llm_logp_BV)
  )
  return cache, logp


@dataclasses.dataclass(frozen=True)
class Routed(DecodeSpec):
  """Routed decoding's spec; models (large, small): the small model generates, the large
  one chooses the tokens at which `router` fires and runs only then (module docstring).

  chunk: pending tokens the large model reads per pass when it catches up (its cache gets
    `chunk` slots of slack).
  Decoded.trace: large_used / small_choice / large_choice [B, N] (large_choice -1 where it
  was not used), batch_calls [N] (the large model ran before choosing token t).
  """

  router: Router = Router()
  chunk: int = 8
  sampler: Sampler = Greedy()
  min_new_tokens: int = 0

  num_models = 2
  model_names = ("large", "small")
  per_call_outputs = ("batch_calls", "read")

  @property
  def cache_slack(self) -> int:
    return int(self.chunk)

  def check_settings(self) -> None:
    if not isinstance(self.router, Router):
      raise ValueError(f"router must be an l2s_jax.collab Router, got {self.router!r}")
    self.router.validate()
    if not (isinstance(self.chunk, int) and not isinstance(self.chunk, bool) and self.chunk >= 1):
      raise SpecError("chunk", "{name} must be an integer >= 1, got %r" % (self.chunk,))

  def validate(self, max_new_tokens: int) -> None:
    self.check_settings()
    self.router.check_model()
    validate_generation_args(max_new_tokens, self.min_new_tokens, self.sampler)

  def run(self, models, params, inputs, rng, knobs, *, max_new_tokens, vocab):
    llm, slm = models
    router, chunk = self.router, self.chunk
    b, n = inputs.ids.shape[0], max_new_tokens
    firsts, caches = prefill(models, params, inputs)
    logps = [log_probs(f, vocab) for f in firsts]
    stop = inputs.stops_E
    zeros = jnp.zeros((b, n), jnp.int32)
    carry = {
      "llm_cache": caches[0],
      "slm_cache": caches[1],
      "llm_logp": logps[0],
      "slm_logp": logps[1],
      "fire": router.route((logps[0], logps[1])),
      "pending": jnp.zeros((b, n), jnp.int32),
      "n_pending": jnp.zeros((b,), jnp.int32),
      "finished": jnp.zeros((b,), bool),
      "t": jnp.zeros((), jnp.int32),
      "llm_used": jnp.zeros((b, n), bool),
      "batch_calls": jnp.zeros((n,), bool),
      "slm_choice": zeros,
      "llm_choice": zeros,
      "read": jnp.zeros((), jnp.int32),
    }

    def step_fn(c, token_B):
      t, live = c["t"], ~c["finished"]
      put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, t))
      used = c["fire"] & live
      record = {
        "llm_used": put(c["llm_used"], used),
        "batch_calls": c["batch_calls"].at[t].set(jnp.any(used)),
        "slm_choice": put(c["slm_choice"], argmax(c["slm_logp"])),
        "llm_choice": put(c["llm_choice"], jnp.where(used, argmax(c["llm_logp"]), -1)),
      }
      finished = c["finished"] | jnp.isin(token_B, stop)
      # The small model reads every chosen token.
      logits, slm_cache = extend(slm, params[1], token_B[:, None], c["slm_cache"])
      slm_logp = log_probs(logits[:, -1], vocab)
      # The large one owes it too; it reads its debt only when a live row's router fires next.
      pending = jax.vmap(lambda row, i, x: row.at[i].set(x))(c["pending"], c["n_pending"], token_B)
      n_pending = c["n_pending"] + 1
      fire = router.route((c["llm_logp"], slm_logp)) & ~finished
      run = jnp.any(fire) & (t + 1 < n)
      llm_cache, llm_logp = catch_up(
        llm,
        params[0],
        c["llm_cache"],
        pending,
        n_pending,
        c["llm_logp"],
        chunk=chunk,
        vocab=vocab,
        run=run,
      )
      read = c["read"] + jnp.where(run, jnp.sum(n_pending), 0)
      n_pending = jnp.where(run, 0, n_pending)
      return slm_logp, {
        **c,
        **record,
        "llm_cache": llm_cache,
        "slm_cache": slm_cache,
        "llm_logp": llm_logp,
        "slm_logp": slm_logp,
        "fire": fire,
        "pending": pending,
        "n_pending": n_pending,
        "finished": finished,
        "t": t + 1,
        "read": read,
      }

    def processor(logits_BV, state):
      c = state.carry
      return jnp.where(c["fire"][:, None], c["llm_logp"], c["slm_logp"])

    state = sample_loop(
      self, step_fn, logps[1], carry, rng, inputs, max_new_tokens=n, logits_processor=processor
    )
    c = state.carry
    return {
      "tokens": state.tokens,
      "lengths": state.lengths,
      "large_used": c["llm_used"],
      "small_choice": c["slm_choice"],
      "large_choice": c["llm_choice"],
      "batch_calls": c["batch_calls"],
      "read": c["read"],
    }

  def finish(self, out, rows) -> Decoded:
    """Per row as Combined; per call: steps (the batch's decoding steps, its longest row),
    batch_calls (steps at which the large model ran), large_tokens_read (tokens it read
    after the prompt: its decode work)."""
    stats, trace = collab_stats(out, rows)
    steps = int(out["lengths"].max()) if out["lengths"].size else 0
    trace["batch_calls"] = out["batch_calls"]
    batch = {
      "steps": float(steps),
      "batch_calls": float(out["batch_calls"][:steps].sum()),
      "large_tokens_read": float(out["read"]),
    }
    return Decoded(out["tokens"], out["lengths"], stats, batch, trace, self)

  def summarize(self, stats, batch) -> dict:
    generated = int(stats["generated"])
    return {
      **collab_summary(stats),
      # The batch runs the large model when any of its rows fires.
      "batch_call_rate": batch["batch_calls"] / max(batch["steps"], 1.0),
      "large_tokens_read_per_token": batch["large_tokens_read"] / max(generated, 1),
    }


def routed_generate(
  models: Sequence,
  params: Sequence,
  input_ids,
  attention_mask=None,
  *,
  router: Router,
  chunk: int = 8,
  sampler: Sampler = Greedy(),
  min_new_tokens: int = 0,
  eos_id=None,
  **request,
) -> Decoded:
  """`decode(Routed(router, chunk, sampler, min_new_tokens), (large, small), ...)`.
  Request arguments (max_new_tokens, eos_id, stop_ids, pad_id, rng, prompt_buckets,
  extra_inputs, mesh, ...) as `l2s_jax.decoding.decode`."""
  spec = Routed(router, chunk, sampler, min_new_tokens)
  return decode(spec, models, params, input_ids, attention_mask, eos_id=eos_id, **request)
