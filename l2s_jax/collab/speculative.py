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
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.collab.vocab import common_vocab, cut
from l2s_jax import sharding
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS
from l2s_jax.decoding.request import prepare_request, validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler

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


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  tokens: np.ndarray      # int32 [B, max_new_tokens], pad after each row's stop token
  lengths: np.ndarray     # int32 [B]
  drafted: np.ndarray     # int32 [B] draft tokens proposed to the LLM
  accepted: np.ndarray    # int32 [B] of those, kept
  rejected: np.ndarray    # int32 [B] iterations that ended at a rejection
  llm_calls: np.ndarray   # int32 [B] LLM forward passes (the prefill included)
  iterations: int
  reached_at: np.ndarray | None = None    # int32 [B, G] draft position i was verified
  accepted_at: np.ndarray | None = None   # int32 [B, G] ... and kept

  @property
  def acceptance_by_position(self) -> list[float]:
    """P(draft i kept | drafts 1..i-1 kept), position by position (nan where never reached)."""
    reached, kept = self.reached_at.sum(0), self.accepted_at.sum(0)
    return [float(a / r) if r else float("nan") for a, r in zip(kept, reached)]

  @property
  def acceptance_rate(self) -> float:
    """alpha: the per-token acceptance probability, estimated as kept / (kept + rejections)."""
    return float(self.accepted.sum() / max(self.accepted.sum() + self.rejected.sum(), 1))

  @property
  def draft_acceptance(self) -> float:
    """Share of all proposed draft tokens that were kept."""
    return float(self.accepted.sum() / max(self.drafted.sum(), 1))

  @property
  def tokens_per_llm_call(self) -> float:
    return float(self.lengths.sum() / max(self.llm_calls.sum(), 1))

  def stats(self) -> dict:
    return {"acceptance_rate": self.acceptance_rate, "draft_acceptance": self.draft_acceptance,
            "acceptance_by_position": self.acceptance_by_position,
            "tokens_per_llm_call": self.tokens_per_llm_call,
            "llm_calls_per_token": 1.0 / max(self.tokens_per_llm_call, 1e-9),
            "mean_accepted_per_call": float(self.accepted.sum() / max(self.llm_calls.sum(), 1)),
            "generated_tokens": int(self.lengths.sum()), "iterations": self.iterations}


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


def speculative_loop(llm, slm, llm_params, slm_params, llm_first_logits, llm_cache, slm_cache,
                     rng, *, max_new_tokens: int, max_gamma: int, sampler: Sampler,
                     draft_sampler: Sampler, stop_ids: Sequence[int], pad_id: int, vocab: int,
                     adaptive: bool, gamma0: int, rollback: float = 0.0) -> SpecState:
  """The traceable loop; caches come from each model's prefill of the same prompts."""
  G, N = max_gamma, max_new_tokens
  b = llm_first_logits.shape[0]
  stop = jnp.asarray(sorted(set(stop_ids)) or [-1], jnp.int32)
  greedy = sampler.greedy
  # Greedy decoding draws nothing: no key is split (each split is a small loop on CPU).
  split = (lambda r, n=2: (r,) * n) if greedy and draft_sampler.greedy else jax.random.split
  lv, sv = {"params": llm_params}, {"params": slm_params}
  rng, key = split(rng)
  first = sampler.sample(key, cut(llm_first_logits, vocab).astype(jnp.float32))
  zeros = jnp.zeros((b,), jnp.int32)
  tokens = jnp.full((b, N + G + 1), pad_id, jnp.int32).at[:, 0].set(first)
  state = SpecState(
      tokens=tokens, lengths=jnp.ones((b,), jnp.int32),
      done=jnp.isin(first, stop) | (N <= 1), llm_next=first,
      slm_next=jnp.stack([first, jnp.full_like(first, pad_id)], axis=1),
      slm_owed=jnp.ones((b,), jnp.int32), llm_cache=llm_cache, slm_cache=slm_cache,
      gamma=jnp.asarray(gamma0, jnp.int32), rng=rng, drafted=zeros, accepted=zeros,
      rejected=zeros, llm_calls=jnp.ones((b,), jnp.int32),
      reached_at=jnp.zeros((b, G), jnp.int32), accepted_at=jnp.zeros((b, G), jnp.int32),
      iterations=jnp.zeros((), jnp.int32))

  def slm_logits(logits):
    return cut(logits, vocab).astype(jnp.float32)

  def draft(s: SpecState):
    """g draft tokens [B, G] (pad past g), their proposal log-probs [B, G, V] and the cache."""
    g = s.gamma
    start = s.slm_cache["index"]
    logits_BTV, cache = slm.apply(sv, s.slm_next, s.slm_cache, method=slm.extend)
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
      fed = jax.lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1)        # d_i, [B, 1]
      logits, cache = slm.apply(sv, fed, cache, method=slm.extend)
      logits = slm_logits(logits[:, -1])
      rng, key = split(rng)
      d = draft_sampler.sample(key, logits)
      drafts = jax.lax.dynamic_update_slice(drafts, d[:, None], (0, i))
      if not greedy:
        logq = jax.lax.dynamic_update_slice(logq, draft_sampler.log_probs(logits)[:, None],
                                            (0, i, 0))
      return cache, drafts, logq, rng

    carry = (cache, drafts, logq, rng)
    if adaptive:                       # g changes at run time: a loop
      carry = jax.lax.fori_loop(1, g, body, carry)
    else:                              # g == G: unrolled, no inner loop overhead
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
    block = jnp.concatenate([s.llm_next[:, None], drafts], axis=1)          # [B, G + 1]
    with jax.named_scope("verify"):
      logits_BTV, llm_cache = llm.apply(lv, block, s.llm_cache, method=llm.extend)
    logits_BTV = cut(logits_BTV, vocab).astype(jnp.float32)
    valid = jnp.arange(G)[None, :] < g                                       # [1, G]
    rng, k_accept, k_next = split(rng, 3)
    if greedy:
      target = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)            # [B, G + 1]
      ok = drafts == target[:, :G]
      if rollback > 0:                 # BiLD: also keep drafts the LLM finds likely enough
        logp = jax.nn.log_softmax(logits_BTV[:, :G], axis=-1)
        ok |= -jnp.take_along_axis(logp, drafts[..., None], -1)[..., 0] <= rollback
      ok &= valid
    else:
      logp = jax.vmap(sampler.log_probs, in_axes=1, out_axes=1)(logits_BTV)  # [B, G + 1, V]
      lp_d = jnp.take_along_axis(logp[:, :G], drafts[..., None], -1)[..., 0]
      lq_d = jnp.take_along_axis(logq, drafts[..., None], -1)[..., 0]
      u = jax.random.uniform(k_accept, (b, G))
      ok = (jnp.log(u) < lp_d - lq_d) & valid
    k = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)        # [B] accepted
    if greedy:
      nxt = _take(target, k)
    else:
      p_k = jnp.exp(_take(logp, k))
      q_k = jnp.exp(_take(jnp.concatenate([logq, logq[:, :1]], axis=1), k))
      residual = jnp.maximum(p_k - q_k, 0.0)
      all_kept = (k == g)[:, None]
      bad = jnp.sum(residual, axis=-1, keepdims=True) <= 0.0                 # p == q there
      dist = jnp.where(all_kept | bad, p_k, residual)
      nxt = _sample_log(k_next, jnp.log(dist))
    # Commit d_1..d_k and nxt, cut at a stop token and at N.
    new = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    j = jnp.arange(G + 1)[None, :]
    new = jnp.where(j == k[:, None], nxt[:, None], new)                      # [B, G + 1]
    is_stop = jnp.isin(new, stop) & (j <= k[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, G + 1), axis=1)
    m = jnp.minimum(jnp.minimum(k + 1, first_stop + 1), N - s.lengths)
    m = jnp.where(active, m, 0)
    cols = s.lengths[:, None] + j
    keep = j < m[:, None]
    tokens = s.tokens.at[jnp.arange(b)[:, None], cols].set(
        jnp.where(keep, new, pad_id), mode="promise_in_bounds")
    lengths = s.lengths + m
    done = s.done | (first_stop < m) | (lengths >= N)
    # Caches: keep what the committed prefix needs; frozen rows stay where they were.
    llm_index = jnp.where(active, llm_start + 1 + k, llm_start)
    slm_keep = s.slm_owed + jnp.minimum(k, g - 1)
    slm_index = jnp.where(active, slm_start + slm_keep, slm_start)
    full = k == g
    d_g = _take(drafts, jnp.maximum(g - 1, 0) * jnp.ones((b,), jnp.int32))
    slm_next = jnp.where(full[:, None], jnp.stack([d_g, nxt], 1),
                         jnp.stack([nxt, jnp.full_like(nxt, pad_id)], 1))
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
        tokens=tokens, lengths=lengths, done=done,
        llm_next=jnp.where(active, nxt, s.llm_next), slm_next=slm_next, slm_owed=slm_owed,
        llm_cache={**llm_cache, "index": llm_index}, slm_cache={**slm_cache, "index": slm_index},
        gamma=gamma, rng=rng, drafted=s.drafted + act * g, accepted=s.accepted + act * k,
        rejected=s.rejected + act * (k < g), llm_calls=s.llm_calls + act,
        reached_at=s.reached_at + reached, accepted_at=s.accepted_at + kept,
        iterations=s.iterations + 1)

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


SPEC_STATIC = ("llm", "slm", "max_new_tokens", "max_gamma", "sampler", "draft_sampler",
               "stop_ids", "pad_id", "vocab", "adaptive", "gamma0", "llm_cache_len",
               "slm_cache_len", "rollback")


@functools.partial(jax.jit, static_argnames=SPEC_STATIC)
def _speculative_jit(llm_params, slm_params, ids, mask, rng, llm_extra, slm_extra, *, llm, slm,
                     max_new_tokens, max_gamma, sampler, draft_sampler, stop_ids, pad_id, vocab,
                     adaptive, gamma0, llm_cache_len, slm_cache_len, rollback):
  first, llm_cache = llm.apply({"params": llm_params}, ids, mask, max_len=llm_cache_len,
                               method=llm.prefill, **llm_extra)
  _, slm_cache = slm.apply({"params": slm_params}, ids, mask, max_len=slm_cache_len,
                           method=slm.prefill, **slm_extra)
  s = speculative_loop(llm, slm, llm_params, slm_params, first, llm_cache, slm_cache, rng,
                       max_new_tokens=max_new_tokens, max_gamma=max_gamma, sampler=sampler,
                       draft_sampler=draft_sampler, stop_ids=stop_ids, pad_id=pad_id,
                       vocab=vocab, adaptive=adaptive, gamma0=gamma0, rollback=rollback)
  return (s.tokens[:, :max_new_tokens], s.lengths, s.drafted, s.accepted, s.rejected,
          s.llm_calls, s.reached_at, s.accepted_at, s.iterations)


def speculative_generate(llm, llm_params, slm, slm_params, input_ids, attention_mask=None, *,
                         max_new_tokens: int, gamma: int = 5, eos_id=None,
                         sampler: Sampler = Greedy(), draft_sampler: Sampler | None = None,
                         adaptive: bool = False, rng: Array | None = None,
                         stop_ids: Sequence[int] = (), pad_id: int = 0,
                         tokenizer_size: int | None = None,
                         prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                         llm_extra_inputs: dict | None = None,
                         slm_extra_inputs: dict | None = None, mesh=None,
                         rollback: float = 0.0) -> SpeculativeOutput:
  """Generates with the LLM's output distribution, drafting with the SLM.

  Args:
    llm, slm: l2s_jax models of the same kind of input (both decoder-only, or
      both reading the prompt with an encoder), sharing a tokenizer.
    gamma: draft length; with `adaptive` the largest one, starting at gamma
      and moving +2 after an iteration where every row kept all its drafts,
      -1 otherwise (transformers' heuristic), batch-wide.
    sampler: the LLM's decoding rule (Greedy: the output equals the LLM's
      greedy output). draft_sampler: how the SLM drafts (default: sampler);
      acceptance uses exactly its distribution as q.
    tokenizer_size: for checkpoints whose vocabularies differ by padding rows.
    llm_extra_inputs, slm_extra_inputs: more prefill inputs of each model,
      e.g. an LLM-to-SLM draft's LLM prompt.
    mesh: split the batch over the mesh's data axes; params are used as placed.
    rollback: > 0 (greedy only): BiLD's rollback policy (Kim et al. 2023), lossy and
      tunable: a draft is also kept when the LLM's cross-entropy on it, -log p_L(d_i), is at
      most `rollback` nats; the first draft above it (and not the LLM's argmax) is replaced
      by the LLM's argmax and the rest rolled back. 0: lossless (the LLM's greedy output).
  Returns:
    SpeculativeOutput: tokens [B, N], lengths and per-row statistics.
  """
  draft_sampler = sampler if draft_sampler is None else draft_sampler
  validate_generation_args(max_new_tokens, 0, sampler)
  validate_generation_args(max_new_tokens, 0, draft_sampler)
  if not (isinstance(gamma, (int, np.integer)) and gamma >= 1):
    raise ValueError(f"gamma (draft length) must be an integer >= 1, got {gamma!r}")
  if not (isinstance(rollback, (int, float)) and rollback >= 0):
    raise ValueError(f"rollback must be a cross-entropy >= 0 (nats), got {rollback!r}")
  if rollback > 0 and not sampler.greedy:
    raise ValueError("rollback (BiLD) is a greedy policy: use the Greedy sampler")
  if sampler.greedy != draft_sampler.greedy and sampler.greedy:
    raise ValueError("greedy verification needs a greedy draft_sampler "
                     f"(got {draft_sampler!r}); sampled drafts need a sampling sampler")
  vocab = common_vocab([llm, slm], tokenizer_size, names=["LLM", "SLM"])
  # Room for the verify block (G + 1 slots) past the last committed token.
  req = prepare_request([llm, slm], input_ids, attention_mask,
                        budget=int(max_new_tokens) + int(gamma) + 1, vocab=vocab, eos_id=eos_id,
                        stop_ids=stop_ids, pad_id=pad_id, prompt_buckets=prompt_buckets,
                        extra_inputs=[llm_extra_inputs, slm_extra_inputs], mesh=mesh)
  *rows, iters = _speculative_jit(
      llm_params, slm_params, req.input_ids, req.attention_mask,
      jax.random.PRNGKey(0) if rng is None else rng, req.extra[0], req.extra[1], llm=llm,
      slm=slm, max_new_tokens=int(max_new_tokens), max_gamma=int(gamma), sampler=sampler,
      draft_sampler=draft_sampler, stop_ids=req.stop_ids, pad_id=int(pad_id), vocab=vocab,
      adaptive=bool(adaptive), gamma0=int(gamma), llm_cache_len=req.cache_lens[0],
      slm_cache_len=req.cache_lens[1], rollback=float(rollback))
  tokens, lengths, drafted, accepted, rejected, calls, reached, kept = req.finish(*rows)
  return SpeculativeOutput(tokens=tokens, lengths=lengths, drafted=drafted, accepted=accepted,
                           rejected=rejected, llm_calls=calls,
                           iterations=int(sharding.to_host(iters)), reached_at=reached,
                           accepted_at=kept)
