"""Speculative decoding: the SLM drafts, the LLM verifies, in one compiled loop.

Each iteration of the `lax.while_loop`:

  1. draft   the SLM proposes g tokens d_1..d_g, one cached step each, drawn
             from q_i = draft_sampler's distribution (kept for step 2);
  2. verify  the LLM reads [last committed token, d_1..d_G] in ONE forward
             pass: G + 1 rows of logits p_1..p_{G+1};
  3. accept  greedy: d_i is kept while d_i == argmax p_i. Sampling (Leviathan
             et al. 2023; Chen et al. 2023): d_i is kept with probability
             min(1, p_i(d_i) / q_i(d_i)); the first rejected position draws
             from norm(max(0, p - q)); when all g are kept a bonus token is
             drawn from p_{g+1}. The output is distributed exactly as the
             LLM's own sampling (or equal to its greedy output). BiLD's
             rollback (greedy, lossy): d_i is also kept when -log p_i(d_i) is
             at most a threshold;
  4. commit  each row appends its k accepted drafts and the one LLM token
             (k differs per row), cut at a stop token and at max_new_tokens;
             both KV caches roll back to the committed prefix by resetting
             each row's cache index (slots past it are stale and never read).

G is the static draft buffer; g <= G is the (optionally adaptive) number of
tokens drafted this iteration. The LLM always verifies G + 1 positions (one
static shape); positions past g count as rejected.

Cache bookkeeping. The LLM's cache holds the committed text except its last
token, which is fed first in the next verify pass. The SLM may owe two tokens
(after a full acceptance: d_g, never fed, and the bonus), so its first draft
step always reads a [B, 2] block and the cache index then moves by 1 or 2 per
row; a second slot that is not owed is written but left past the index.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.decoding.front import decode
from l2s_jax.decoding.request import validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler, argmax
from l2s_jax.decoding.spec import Decoded, DecodeSpec, SpecError, extend, prefill
from l2s_jax.decoding.vocab import cut

Array = jax.Array


@flax.struct.dataclass
class SpecState:
  """Loop state. B rows, N = max_new_tokens, G = max draft length.

  tokens:    int32 [B, N + G + 1]  committed tokens (pad after; the tail is slack)
  lengths:   int32 [B]             committed tokens per row (<= N)
  done:      bool [B]
  llm_next:  int32 [B]             last committed token, not yet in the LLM cache
  slm_next:  int32 [B, 2]          tokens the SLM cache still owes (1 or 2 of them)
  slm_owed:  int32 [B]             how many of slm_next are real (1 or 2)
  gamma:     int32 []              drafts this iteration (adaptive or fixed)
  drafted, accepted, rejected, llm_calls: int32 [B]  statistics
  reached_at, accepted_at: int32 [B, G]  draft position i was verified (every draft before
                                   it kept) / kept: the per-position acceptance profile
  iterations: int32 []
  """

  tokens: Array
  lengths: Array
  done: Array
  llm_next: Array
  slm_next: Array
  slm_owed: Array
  llm_cache: dict
  slm_cache: dict
  gamma: Array
  rng: Array
  drafted: Array
  accepted: Array
  rejected: Array
  llm_calls: Array
  reached_at: Array
  accepted_at: Array
  iterations: Array


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
  """Leviathan et al. (2023), Thm 3.8: (1 - alpha^(g+1)) / ((1 - alpha)(g c + 1)).

  `cost_ratio` c = time of one SLM step / time of one LLM step. Our draft
  phase runs g SLM steps (the first reads two tokens), so g c + 1 is also our
  cost per iteration, up to the verify pass costing more than one LLM step.
  """
  tokens = gamma + 1 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
  return tokens / (gamma * cost_ratio + 1.0)


def _take(x_BTV: Array, i_B: Array) -> Array:
  """x[b, i_B[b]] for a [B, T, ...] array."""
  idx = i_B.reshape((-1,) + (1,) * (x_BTV.ndim - 1))
  return jnp.take_along_axis(x_BTV, idx, axis=1)[:, 0]


def _sample_log(rng: Array, logp_BV: Array) -> Array:
  return jax.random.categorical(rng, logp_BV, axis=-1).astype(jnp.int32)


def speculative_loop(
  llm,
  slm,
  llm_params,
  slm_params,
  llm_first_logits,
  llm_cache,
  slm_cache,
  rng,
  *,
  max_new_tokens: int,
  max_gamma: int,
  sampler: Sampler,
  draft_sampler: Sampler,
  stop_ids: Sequence[int],
  pad_id: int,
  vocab: int,
  adaptive: bool,
  gamma0: int,
  rollback: float = 0.0,
) -> SpecState:
  """The traceable loop; caches come from each model's prefill of the same prompts."""
  G, N = max_gamma, max_new_tokens
  b = llm_first_logits.shape[0]
  stop = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
  if stop.shape[0] == 0:
    stop = jnp.full((1,), -1, jnp.int32)
  greedy = sampler.greedy
  # Greedy decoding draws nothing: no key is split (each split is a small loop on CPU).
  split = (lambda r, n=2: (r,) * n) if greedy and draft_sampler.greedy else jax.random.split
  rng, key = split(rng)
  first = sampler.sample(key, cut(llm_first_logits, vocab).astype(jnp.float32))
  zeros = jnp.zeros((b,), jnp.int32)
  tokens = jnp.full((b, N + G + 1), pad_id, jnp.int32).at[:, 0].set(first)
  state = SpecState(
    tokens=tokens,
    lengths=jnp.ones((b,), jnp.int32),
    done=jnp.isin(first, stop) | (N <= 1),
    llm_next=first,
    slm_next=jnp.stack([first, jnp.full_like(first, pad_id)], axis=1),
    slm_owed=jnp.ones((b,), jnp.int32),
    llm_cache=llm_cache,
    slm_cache=slm_cache,
    gamma=jnp.asarray(gamma0, jnp.int32),
    rng=rng,
    drafted=zeros,
    accepted=zeros,
    rejected=zeros,
    llm_calls=jnp.ones((b,), jnp.int32),
    reached_at=jnp.zeros((b, G), jnp.int32),
    accepted_at=jnp.zeros((b, G), jnp.int32),
    iterations=jnp.zeros((), jnp.int32),
  )

  def slm_logits(logits):
    return cut(logits, vocab).astype(jnp.float32)

  def draft(s: SpecState):
    """g draft tokens [B, G] (pad past g), their proposal log-probs [B, G, V] and the cache."""
    g = s.gamma
    start = s.slm_cache["index"]
    logits_BTV, cache = extend(slm, slm_params, s.slm_next, s.slm_cache)
    cache = {**cache, "index": start + s.slm_owed}
    logits = slm_logits(_take(logits_BTV, s.slm_owed - 1))
    rng, key = split(s.rng)
    d = draft_sampler.sample(key, logits)
    drafts = jnp.full((b, G), pad_id, jnp.int32).at[:, 0].set(d)
    logq = jnp.zeros((b, G, vocab), jnp.float32)
    if not greedy:
      logq = logq.at[:, 0].set(draft_sampler.log_probs(logits))

    def body(i, carry):
      cache, drafts, logq, rng = carry
      fed = jax.lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1)  # d_i, [B, 1]
      logits, cache = extend(slm, slm_params, fed, cache)
      logits = slm_logits(logits[:, -1])
      rng, key = split(rng)
      d = draft_sampler.sample(key, logits)
      drafts = jax.lax.dynamic_update_slice(drafts, d[:, None], (0, i))
      if not greedy:
        logq = jax.lax.dynamic_update_slice(
          logq, draft_sampler.log_probs(logits)[:, None], (0, i, 0)
        )
      return cache, drafts, logq, rng

    carry = (cache, drafts, logq, rng)
    if adaptive:  # g changes at run time: a loop
      carry = jax.lax.fori_loop(1, g, body, carry)
    else:  # g == G: unrolled, no inner loop overhead
      for i in range(1, G):
        carry = body(i, carry)
    cache, drafts, logq, rng = carry
    return drafts, logq, cache, rng, start

  def body(s: SpecState) -> SpecState:
    g = s.gamma
    active = ~s.done
    with jax.named_scope("draft"):
      drafts, logq, slm_cache, rng, slm_start = draft(s)
    # Verify: one LLM pass over [last committed, d_1..d_G]; p_i scores d_i.
    llm_start = s.llm_cache["index"]
    block = jnp.concatenate([s.llm_next[:, None], drafts], axis=1)  # [B, G + 1]
    with jax.named_scope("verify"):
      logits_BTV, llm_cache = extend(llm, llm_params, block, s.llm_cache)
    logits_BTV = cut(logits_BTV, vocab).astype(jnp.float32)
    valid = jnp.arange(G)[None, :] < g  # [1, G]
    rng, k_accept, k_next = split(rng, 3)
    if greedy:
      target = argmax(logits_BTV)  # [B, G + 1]
      ok = drafts == target[:, :G]
      if rollback > 0:  # BiLD: also keep drafts the LLM finds likely enough
        logp = jax.nn.log_softmax(logits_BTV[:, :G], axis=-1)
        ok |= -jnp.take_along_axis(logp, drafts[..., None], -1)[..., 0] <= rollback
      ok &= valid
    else:
      logp = jax.vmap(sampler.log_probs, in_axes=1, out_axes=1)(logits_BTV)  # [B, G + 1, V]
      lp_d = jnp.take_along_axis(logp[:, :G], drafts[..., None], -1)[..., 0]
      lq_d = jnp.take_along_axis(logq, drafts[..., None], -1)[..., 0]
      u = jax.random.uniform(k_accept, (b, G))
      ok = (jnp.log(u) < lp_d - lq_d) & valid
    k = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B] accepted
    if greedy:
      nxt = _take(target, k)
    else:
      p_k = jnp.exp(_take(logp, k))
      q_k = jnp.exp(_take(jnp.concatenate([logq, logq[:, :1]], axis=1), k))
      residual = jnp.maximum(p_k - q_k, 0.0)
      all_kept = (k == g)[:, None]
      bad = jnp.sum(residual, axis=-1, keepdims=True) <= 0.0  # p == q there
      dist = jnp.where(all_kept | bad, p_k, residual)
      nxt = _sample_log(k_next, jnp.log(dist))
    # Commit d_1..d_k and nxt, cut at a stop token and at N.
    new = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    j = jnp.arange(G + 1)[None, :]
    new = jnp.where(j == k[:, None], nxt[:, None], new)  # [B, G + 1]
    is_stop = jnp.isin(new, stop) & (j <= k[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, G + 1), axis=1)
    m = jnp.minimum(jnp.minimum(k + 1, first_stop + 1), N - s.lengths)
    m = jnp.where(active, m, 0)
    cols = s.lengths[:, None] + j
    keep = j < m[:, None]
    tokens = s.tokens.at[jnp.arange(b)[:, None], cols].set(
      jnp.where(keep, new, pad_id), mode="promise_in_bounds"
    )
    lengths = s.lengths + m
    done = s.done | (first_stop < m) | (lengths >= N)
    # Caches: keep what the committed prefix needs; frozen rows stay where they were.
    llm_index = jnp.where(active, llm_start + 1 + k, llm_start)
    slm_keep = s.slm_owed + jnp.minimum(k, g - 1)
    slm_index = jnp.where(active, slm_start + slm_keep, slm_start)
    full = k == g
    d_g = _take(drafts, jnp.maximum(g - 1, 0) * jnp.ones((b,), jnp.int32))
    slm_next = jnp.where(
      full[:, None], jnp.stack([d_g, nxt], 1), jnp.stack([nxt, jnp.full_like(nxt, pad_id)], 1)
    )
    slm_next = jnp.where(active[:, None], slm_next, s.slm_next)
    slm_owed = jnp.where(active, jnp.where(full, 2, 1), s.slm_owed)
    gamma = g
    if adaptive:
      all_full = jnp.all(full | ~active)
      gamma = jnp.where(all_full, jnp.minimum(g + 2, G), jnp.maximum(g - 1, 1))
    act = active.astype(jnp.int32)
    pos = jnp.arange(G)[None, :]
    reached = ((pos < g) & (pos <= k[:, None])).astype(jnp.int32) * act[:, None]
    kept = (pos < k[:, None]).astype(jnp.int32) * act[:, None]
    return SpecState(
      tokens=tokens,
      lengths=lengths,
      done=done,
      llm_next=jnp.where(active, nxt, s.llm_next),
      slm_next=slm_next,
      slm_owed=slm_owed,
      llm_cache={**llm_cache, "index": llm_index},
      slm_cache={**slm_cache, "index": slm_index},
      gamma=gamma,
      rng=rng,
      drafted=s.drafted + act * g,
      accepted=s.accepted + act * k,
      rejected=s.rejected + act * (k < g),
      llm_calls=s.llm_calls + act,
      reached_at=s.reached_at + reached,
      accepted_at=s.accepted_at + kept,
      iterations=s.iterations + 1,
    )

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


@dataclasses.dataclass(frozen=True)
class Speculative(DecodeSpec):
  """Speculative decoding's spec; models (large, small): the small one drafts, the large
  one verifies, and the output follows the large model's `sampler` (its greedy output, or
  its sampling distribution).

  gamma: draft length; with `adaptive` the largest one, starting at gamma and moving +2
    after an iteration where every row kept all its drafts, -1 otherwise (transformers'
    heuristic), batch-wide.
  sampler: the large model's decoding rule. draft_sampler: how the small model drafts
    (default: sampler); acceptance uses exactly its distribution as q.
  rollback: > 0 (greedy only): BiLD's rollback policy (Kim et al. 2023), lossy and tunable:
    a draft is also kept when the large model's cross-entropy on it, -log p_L(d_i), is at
    most `rollback` nats. 0: lossless.
  Both models must read the prompt the same way and share a tokenizer.
  """

  gamma: int = 5
  adaptive: bool = False
  rollback: float = 0.0
  sampler: Sampler = Greedy()
  draft_sampler: Sampler | None = None

  num_models = 2
  model_names = ("large", "small")
  per_call_outputs = ("iterations",)

  @property
  def drafts_with(self) -> Sampler:
    return self.sampler if self.draft_sampler is None else self.draft_sampler

  @property
  def cache_slack(self) -> int:
    return int(self.gamma) + 1  # the verify block (G + 1 slots) past the last token

  def validate(self, max_new_tokens: int) -> None:
    validate_generation_args(max_new_tokens, 0, self.sampler)
    validate_generation_args(max_new_tokens, 0, self.drafts_with)
    self.check_settings()

  def check_settings(self) -> None:
    if not (
      isinstance(self.gamma, (int, np.integer))
      and not isinstance(self.gamma, bool)
      and self.gamma >= 1
    ):
      raise SpecError(
        "gamma", "{name}=%r: speculative decoding drafts >= 1 token a pass" % (self.gamma,)
      )
    if not (isinstance(self.rollback, (int, float)) and self.rollback >= 0):
      raise SpecError("rollback", "{name}=%r: a cross-entropy in nats, >= 0" % (self.rollback,))
    if self.rollback > 0 and not self.sampler.greedy:
      raise SpecError(
        "rollback",
        "{name}=%r (BiLD) is a rule of greedy speculative decoding: "
        "decode with the Greedy sampler (temperature 0)" % (self.rollback,),
      )
    if self.sampler.greedy and not self.drafts_with.greedy:
      raise ValueError(
        "greedy verification needs a greedy draft_sampler "
        f"(got {self.drafts_with!r}); sampled drafts need a sampling sampler"
      )

  def run(self, models, params, inputs, rng, knobs, *, max_new_tokens, vocab):
    (first, _), (large_cache, small_cache) = prefill(models, params, inputs)
    s = speculative_loop(
      models[0],
      models[1],
      params[0],
      params[1],
      first,
      large_cache,
      small_cache,
      rng,
      max_new_tokens=max_new_tokens,
      max_gamma=int(self.gamma),
      sampler=self.sampler,
      draft_sampler=self.drafts_with,
      stop_ids=inputs.stops_E,
      pad_id=inputs.pad_id,
      vocab=vocab,
      adaptive=bool(self.adaptive),
      gamma0=int(self.gamma),
      rollback=float(self.rollback),
    )
    return {
      "tokens": s.tokens[:, :max_new_tokens],
      "lengths": s.lengths,
      "drafted": s.drafted,
      "accepted": s.accepted,
      "rejected": s.rejected,
      "large_calls": s.llm_calls,
      "reached_at": s.reached_at,
      "accepted_at": s.accepted_at,
      "iterations": s.iterations,
    }

  def finish(self, out, rows) -> Decoded:
    """Per row: drafted (draft tokens proposed), accepted (of those, kept), rejected
    (iterations that ended at a rejection), large_calls (the large model's passes, the
    prefill included), reached_at / accepted_at [B, G] (draft position i was verified,
    every draft before it kept / and kept: the acceptance profile), generated."""
    names = ("drafted", "accepted", "rejected", "large_calls", "reached_at", "accepted_at")
    stats = {k: out[k] for k in names}
    stats["generated"] = out["lengths"]
    return Decoded(
      out["tokens"], out["lengths"], stats, {"iterations": float(out["iterations"])}, {}, self
    )

  def summarize(self, s, batch) -> dict:
    accepted, rejected = int(s["accepted"]), int(s["rejected"])
    generated, calls = int(s["generated"]), int(s["large_calls"])
    return {
      # alpha, from per-position acceptance: kept / (kept + rejections)
      "acceptance_rate": accepted / max(accepted + rejected, 1),
      # P(draft i kept | drafts 1..i-1 kept); None where position i was never reached
      "acceptance_by_position": [
        float(a / r) if r else None for a, r in zip(s["accepted_at"], s["reached_at"])
      ],
      # the share of proposed drafts kept (drafts after a rejection count: it understates
      # alpha)
      "draft_acceptance": accepted / max(int(s["drafted"]), 1),
      "tokens_per_large_call": generated / max(calls, 1),
      "large_call_rate": calls / max(generated, 1),
      # tokens the large model put in place of a rejected draft, per generated token
      "correction_rate": rejected / max(generated, 1),
      "generated_tokens": generated,
      "large_calls": calls,
      "drafted": int(s["drafted"]),
      "accepted": accepted,
      "rejected": rejected,
      "iterations": int(batch["iterations"]),
    }


def speculative_generate(
  llm,
  llm_params,
  slm,
  slm_params,
  input_ids,
  attention_mask=None,
  *,
  gamma: int = 5,
  sampler: Sampler = Greedy(),
  draft_sampler: Sampler | None = None,
  adaptive: bool = False,
  rollback: float = 0.0,
  llm_extra_inputs: dict | None = None,
  slm_extra_inputs: dict | None = None,
  eos_id=None,
  **request,
) -> Decoded:
  """`decode(Speculative(...), (large, small), ...)` with the large model first; each model's
  extra prefill inputs apart. Request arguments (max_new_tokens, eos_id, stop_ids, pad_id,
  rng, prompt_buckets, mesh, ...) as `l2s_jax.decoding.decode`."""
  spec = Speculative(gamma, adaptive, rollback, sampler, draft_sampler)
  extras = [llm_extra_inputs, slm_extra_inputs]
  models, params = (llm, slm), (llm_params, slm_params)
  return decode(
    spec, models, params, input_ids, attention_mask, eos_id=eos_id, extra_inputs=extras, **request
  )
