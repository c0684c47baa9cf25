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
the LLM when any row fires; `CollabOutput.llm_used` is the per-row decision, `batch_calls`
the steps at which the LLM ran. A router that always fires gives the LLM's own greedy output
(one pending token per call), one that never fires the SLM's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.collab.combine import CollabOutput, Router, prefill_all
from l2s_jax.collab.vocab import common_vocab, cut
from l2s_jax.decoding.loop import decode_loop
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS
from l2s_jax.decoding.request import prepare_request, validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RoutedOutput(CollabOutput):
  batch_calls: np.ndarray = None     # bool [N]: the LLM ran before choosing token t
  llm_tokens_read: int = 0           # tokens the LLM read after the prompt (its decode work)

  @property
  def batch_call_rate(self) -> float:
    """Share of decoding steps at which the LLM ran (any row fired)."""
    steps = int(self.lengths.max()) if self.lengths.size else 0
    return float(self.batch_calls[:steps].mean()) if steps else 0.0


def catch_up(llm, params, cache, pending_BP: Array, n_pending_B: Array, llm_logp_BV: Array,
             *, chunk: int, vocab: int, run: Array | bool = True):
  """The LLM reads each row's first n_pending_B[b] tokens of pending_BP, `chunk` at a time.

  Returns (cache, llm_logp [B, V]: its log-probs of the next token after each row's last
  pending token; rows with nothing pending keep `llm_logp_BV`, chunks run). `run` False:
  zero chunks (nothing read, nothing changes). Traceable."""
  b, p = pending_BP.shape
  longest = jnp.max(n_pending_B)
  chunks = jnp.where(run, (longest + chunk - 1) // chunk, 0)
  padded = jnp.pad(pending_BP, ((0, 0), (0, chunk)))      # a last chunk may read past P

  def body(s):
    j, cache, logp = s
    block = jax.lax.dynamic_slice(padded, (0, j * chunk), (b, chunk))
    count = jnp.clip(n_pending_B - j * chunk, 0, chunk)
    start = cache["index"]
    logits, cache = llm.apply({"params": params}, block, cache, method=llm.extend)
    cache = {**cache, "index": start + count}
    last = jnp.take_along_axis(logits, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    new = jax.nn.log_softmax(cut(last, vocab).astype(jnp.float32), axis=-1)
    return j + 1, cache, jnp.where((count > 0)[:, None], new, logp)

  _, cache, logp = jax.lax.while_loop(lambda s: s[0] < chunks, body,
                                      (jnp.zeros((), jnp.int32), cache, llm_logp_BV))
  return cache, logp


def routed_core(params, ids, mask, rng, extras, *, models, router, sampler, max_new_tokens,
                cache_lens, stop_ids, pad_id, vocab, chunk, min_new_tokens=0):
  """Traceable: prefill both models, then one decode loop; the LLM runs only when asked."""
  llm, slm = models
  b, n = ids.shape[0], max_new_tokens
  logps, caches = prefill_all(models, params, ids, mask, cache_lens, extras, vocab)
  stop = jnp.asarray(stop_ids, jnp.int32)
  zeros = jnp.zeros((b, n), jnp.int32)
  carry = {"llm_cache": caches[0], "slm_cache": caches[1], "llm_logp": logps[0],
           "slm_logp": logps[1], "fire": router.route((logps[0], logps[1])),
           "pending": jnp.zeros((b, n), jnp.int32), "n_pending": jnp.zeros((b,), jnp.int32),
           "finished": jnp.zeros((b,), bool), "t": jnp.zeros((), jnp.int32),
           "llm_used": jnp.zeros((b, n), bool), "batch_calls": jnp.zeros((n,), bool),
           "slm_choice": zeros, "llm_choice": zeros, "read": jnp.zeros((), jnp.int32)}

  def step_fn(c, token_B):
    t, live = c["t"], ~c["finished"]
    put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype), (0, t))
    used = c["fire"] & live
    record = {"llm_used": put(c["llm_used"], used),
              "batch_calls": c["batch_calls"].at[t].set(jnp.any(used)),
              "slm_choice": put(c["slm_choice"], jnp.argmax(c["slm_logp"], axis=-1)),
              "llm_choice": put(c["llm_choice"], jnp.where(used, jnp.argmax(c["llm_logp"], -1),
                                                           -1))}
    finished = c["finished"] | jnp.isin(token_B, stop)
    # The SLM reads every chosen token.
    logits, slm_cache = slm.apply({"params": params[1]}, token_B[:, None], c["slm_cache"],
                                  method=slm.extend)
    slm_logp = jax.nn.log_softmax(cut(logits[:, -1], vocab).astype(jnp.float32), axis=-1)
    # The LLM owes it too; it reads its debt only when a live row's router fires next.
    pending = jax.vmap(lambda row, i, x: row.at[i].set(x))(c["pending"], c["n_pending"],
                                                           token_B)
    n_pending = c["n_pending"] + 1
    fire = router.route((c["llm_logp"], slm_logp)) & ~finished
    run = jnp.any(fire) & (t + 1 < n)
    llm_cache, llm_logp = catch_up(llm, params[0], c["llm_cache"], pending, n_pending,
                                   c["llm_logp"], chunk=chunk, vocab=vocab, run=run)
    read = c["read"] + jnp.where(run, jnp.sum(n_pending), 0)
    n_pending = jnp.where(run, 0, n_pending)
    return slm_logp, {**c, **record, "llm_cache": llm_cache, "slm_cache": slm_cache,
                      "llm_logp": llm_logp, "slm_logp": slm_logp, "fire": fire,
                      "pending": pending, "n_pending": n_pending, "finished": finished,
                      "t": t + 1, "read": read}

  def processor(logits_BV, state):
    c = state.carry
    return jnp.where(c["fire"][:, None], c["llm_logp"], c["slm_logp"])

  state = decode_loop(step_fn, logps[1], carry, rng, max_new_tokens=n, sampler=sampler,
                      stop_ids=stop_ids, pad_id=pad_id, logits_processor=processor,
                      min_new_tokens=min_new_tokens)
  c = state.carry
  return (state.tokens, state.lengths, c["llm_used"], c["slm_choice"], c["llm_choice"],
          c["batch_calls"], c["read"])


_STATIC = ("models", "router", "sampler", "max_new_tokens", "cache_lens", "stop_ids", "pad_id",
           "vocab", "chunk", "min_new_tokens")
_routed_jit = jax.jit(routed_core, static_argnames=_STATIC)


def routed_generate(models: Sequence, params: Sequence, input_ids, attention_mask=None, *,
                    router: Router, max_new_tokens: int, eos_id=None,
                    sampler: Sampler = Greedy(), rng: Array | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0, chunk: int = 8,
                    tokenizer_size: int | None = None,
                    prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                    extra_inputs: Sequence[dict | None] | None = None, mesh=None,
                    min_new_tokens: int = 0) -> RoutedOutput:
  """Routed decoding with models (LLM, SLM): the SLM generates, the LLM chooses the tokens at
  which `router` fires and runs only then (see the module docstring).

  chunk: pending tokens the LLM reads per pass when it catches up (its cache gets `chunk`
    slots of slack). extra_inputs: per model, more prefill inputs (a hybrid's LLM prompt).
  """
  if len(models) != 2 or len(params) != 2:
    raise ValueError(f"routed decoding takes (LLM, SLM): got {len(models)} models and "
                     f"{len(params)} param trees")
  if not isinstance(router, Router):
    raise ValueError(f"router must be an l2s_jax.collab Router, got {router!r}")
  router.validate()
  if not (isinstance(chunk, int) and chunk >= 1):
    raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
  validate_generation_args(max_new_tokens, min_new_tokens, sampler)
  vocab = common_vocab(models, tokenizer_size, names=["LLM", "SLM"])
  req = prepare_request(models, input_ids, attention_mask, budget=int(max_new_tokens) + chunk,
                        vocab=vocab, eos_id=eos_id, stop_ids=stop_ids, pad_id=pad_id,
                        prompt_buckets=prompt_buckets, extra_inputs=extra_inputs, mesh=mesh)
  out = _routed_jit(tuple(params), req.input_ids, req.attention_mask,
                    jax.random.PRNGKey(0) if rng is None else rng, req.extra,
                    models=tuple(models), router=router, sampler=sampler,
                    max_new_tokens=int(max_new_tokens), cache_lens=req.cache_lens,
                    stop_ids=req.stop_ids, pad_id=int(pad_id), vocab=vocab, chunk=int(chunk),
                    min_new_tokens=int(min_new_tokens))
  tokens, lengths, used, slm_choice, llm_choice = req.finish(*out[:5])
  return RoutedOutput(tokens=tokens, lengths=lengths, llm_used=used, slm_choice=slm_choice,
                      llm_choice=llm_choice, batch_calls=np.asarray(out[5]),
                      llm_tokens_read=int(out[6]))
