"""Beam search in one compiled `lax.while_loop`, equal to transformers' beam search.

Follows the vectorised `GenerationMixin._beam_search` of transformers 5.x
step by step (B rows, K beams, N new tokens, V vocabulary, C candidates):

  1. every running beam adds log_softmax(logits) to its summed log-prob, and
     each row keeps the best C = max(2, 1 + #eos) * K of its K * V
     continuations (so K of them survive even if K end in EOS);
  2. a continuation "stops" if its token is an EOS or it fills the last slot;
     the best K that did not stop become the running beams;
  3. those of the best K that stopped compete with the finished hypotheses
     for K finished slots, scored sum_logprob / generated_len ** length_penalty;
  4. a row stops taking hypotheses once its best running beam can no longer
     beat its worst finished one (transformers' `_check_early_stop_heuristic`),
     and the search ends when no row can improve, when every slot is full and
     early_stopping is True, or at the last token.

The same -1e9 offsets, the same float32 divisors and the same candidate
order reproduce transformers' choices and scores up to the models' float
round-off. Intentional differences:
  * the prompt is prefilled once per row and its cache copied to the K
    beams; transformers prefills K identical copies (same result).
  * slots after a hypothesis' EOS hold pad_id. transformers fills them with
    `pad_token_id or eos_token_id`, i.e. with EOS when pad_token_id is 0.
  * sampling, logits processors and num_return_sequences > 1 are not offered.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.decoding.front import decode
from l2s_jax.decoding.spec import Decoded, DecodeSpec, next_token_fn, prefill

Array = jax.Array
# step_fn(carry, tokens [B*K]) -> (logits [B*K, V], carry); every carry leaf is [B*K, ...].
StepFn = Callable[[Any, Array], tuple[Array, Any]]

# transformers' "impossible" score offset. The same constant (not -inf) keeps
# scores and tie order identical; -inf would also give 0 * -inf = nan below.
_NEG = -1.0e9


@flax.struct.dataclass
class BeamScoring:
  """Length-penalty divisors, computed on the host like transformers' Python floats.

  finish_N: f32 [N]  a hypothesis finished at step t is scored
                     sum_logprob / finish_N[t], finish_N[t] = (t + 1) ** length_penalty
  bound_N:  f32 [N]  after step t the best running beam is bounded by
                     running_score / bound_N[t] (early-stop heuristic)
  stop_when_full: bool []  early_stopping is True (the object, as transformers
                     tests it): a row whose K slots are full takes no more
                     hypotheses

  All traced, so another length_penalty or early_stopping does not recompile.
  """

  finish_N: Array
  bound_N: Array
  stop_when_full: Array

  @classmethod
  def create(
    cls, max_new_tokens: int, length_penalty: float = 1.0, early_stopping: bool | str = False
  ) -> "BeamScoring":
    generated = np.arange(1, max_new_tokens + 1)
    # float64 power, then float32: what torch does with `tensor / python_float`.
    finish = np.array([float(n) ** length_penalty for n in generated], np.float32)
    if early_stopping == "never" and length_penalty > 0:
      # A positive penalty favours length: bound by the longest possible hypothesis.
      bound = np.full_like(finish, float(max_new_tokens) ** length_penalty)
    else:
      bound = finish
    return cls(
      finish_N=jnp.asarray(finish),
      bound_N=jnp.asarray(bound),
      stop_when_full=jnp.asarray(early_stopping is True),
    )


@flax.struct.dataclass
class BeamState:
  """Loop state of `beam_search_loop`.

  step:             int32 []         tokens chosen so far (the next column to fill)
  alive:            bool []          transformers' "has unfinished sequences"
  running_tokens:   int32 [B, K, N]  running beams, pad_id past `step`
  running_scores:   f32 [B, K]       their summed log-probs (beams 1..K-1 start at -1e9)
  finished_tokens:  int32 [B, K, N]  finished hypotheses, best first
  finished_scores:  f32 [B, K]       their length-penalised scores (~-1e9 in empty slots)
  finished_lengths: int32 [B, K]     their generated tokens, EOS included
  finished:         bool [B, K]      the slot holds a finished hypothesis
  improvable:       bool [B]         running beams may still beat the worst finished one
  logits:           f32 [B*K, V]     next-token logits of the running beams
  carry:            model state threaded through step_fn, every leaf [B*K, ...]
  """

  step: Array
  alive: Array
  running_tokens: Array
  running_scores: Array
  finished_tokens: Array
  finished_scores: Array
  finished_lengths: Array
  finished: Array
  improvable: Array
  logits: Array
  carry: Any


def _gather_beams(x_BK: Array, index_BJ: Array) -> Array:
  """x [B, K, ...] -> [B, J, ...]: x[b, index[b, j]]."""
  index = index_BJ.reshape(index_BJ.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, index, axis=1)


def reorder_cache(cache: Any, source_beam_BK: Array) -> Any:
  """Gathers every cache row [B*K, ...] from its source beam (of its own prompt).

  Rows are taken as [B, K, ...] along the beam axis, the prompt axis kept: under a batch
  split over chips each chip reorders its own prompts' beams (a take over the flat B*K
  rows could read any row, and XLA all-gathered every layer's cache at every step).
  An encoder-decoder's cross-attention keys/values (`cache["cross"]`) are
  the same for all beams of a prompt, and beams only move within their own
  prompt, so they are left in place rather than copied every step.
  """
  b, k = source_beam_BK.shape

  def take(x):
    rows = _gather_beams(x.reshape(b, k, *x.shape[1:]), source_beam_BK)
    return rows.reshape(x.shape)

  if isinstance(cache, dict) and "cross" in cache:
    return {
      **jax.tree.map(take, {k: v for k, v in cache.items() if k != "cross"}),
      "cross": cache["cross"],
    }
  return jax.tree.map(take, cache)


def beam_search_loop(
  step_fn: StepFn,
  first_logits_BKV: Array,
  carry: Any,
  *,
  num_beams: int,
  max_new_tokens: int,
  eos_ids_E: Array | Sequence[int],
  scoring: BeamScoring,
  pad_id: int | Array = 0,
) -> BeamState:
  """Runs beam search from the first logits of B*K beams (K copies of each row).

  Traceable (call it inside jit). eos_ids_E: int32 [E] distinct ids (may be
  traced; only E is static). The carry is reordered along its leading axis
  whenever beams are, then step_fn feeds the chosen tokens.
  Returns the final state; row b's best hypothesis is `finished_*[b, 0]`.
  """
  bk, v = first_logits_BKV.shape
  k, n = num_beams, max_new_tokens
  b = bk // k
  eos_E = jnp.asarray(eos_ids_E, jnp.int32).reshape(-1)
  c = max(2, 1 + eos_E.shape[0]) * k
  first_k_C = jnp.arange(c) < k  # only the best K candidates may become hypotheses

  state = BeamState(
    step=jnp.zeros((), jnp.int32),
    alive=jnp.ones((), bool),
    running_tokens=jnp.full((b, k, n), pad_id, jnp.int32),
    # Beams 1..K-1 are copies of beam 0: the offset keeps step 0 from picking
    # the same continuation K times.
    running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(_NEG),
    finished_tokens=jnp.full((b, k, n), pad_id, jnp.int32),
    finished_scores=jnp.full((b, k), _NEG, jnp.float32),
    finished_lengths=jnp.zeros((b, k), jnp.int32),
    finished=jnp.zeros((b, k), bool),
    improvable=jnp.ones((b,), bool),
    logits=first_logits_BKV.astype(jnp.float32),
    carry=carry,
  )

  def body(s: BeamState) -> BeamState:
    t = s.step
    logprobs_BKV = jax.nn.log_softmax(s.logits, axis=-1).reshape(b, k, v)
    # The best C of all K x V continuations: each beam's best C, then the best C of those
    # K x C (the same candidates in the same order, ties to the lower beam, then token). A
    # top-k over the flat K x V axis would merge the beam axis into a vocabulary split over
    # chips (tensor parallelism), and XLA gathered every row's logits to do it.
    beam_scores_BKC, beam_tokens_BKC = jax.lax.top_k(logprobs_BKV + s.running_scores[:, :, None], c)
    cand_scores_BC, cand_index_BC = jax.lax.top_k(beam_scores_BKC.reshape(b, k * c), c)
    cand_beam_BC = cand_index_BC // c
    cand_token_BC = jnp.take_along_axis(beam_tokens_BKC.reshape(b, k * c), cand_index_BC, axis=1)
    cand_tokens_BCN = jax.lax.dynamic_update_slice(
      _gather_beams(s.running_tokens, cand_beam_BC), cand_token_BC[:, :, None], (0, 0, t)
    )
    stops_BC = jnp.any(cand_token_BC[:, :, None] == eos_E, axis=-1) | (t == n - 1)

    # Running beams: the best K candidates that did not stop.
    keep_scores_BC = cand_scores_BC + stops_BC.astype(jnp.float32) * _NEG
    running_scores_BK, keep_BK = jax.lax.top_k(keep_scores_BC, k)
    running_tokens_BKN = _gather_beams(cand_tokens_BCN, keep_BK)
    source_beam_BK = jnp.take_along_axis(cand_beam_BC, keep_BK, axis=1)

    # Finished hypotheses: the stopped ones among the best K, when the row takes
    # any, merged with the old ones. The offsets are added one by one, in
    # transformers' order, so the float32 sums are the same.
    just_finished_BC = stops_BC & first_k_C[None, :]
    hyp_scores_BC = cand_scores_BC / scoring.finish_N[t]
    full_B1 = jnp.all(s.finished, axis=-1, keepdims=True) & scoring.stop_when_full
    hyp_scores_BC = hyp_scores_BC + full_B1.astype(jnp.float32) * _NEG
    hyp_scores_BC = hyp_scores_BC + (~s.improvable[:, None]).astype(jnp.float32) * _NEG
    hyp_scores_BC = hyp_scores_BC + (~just_finished_BC).astype(jnp.float32) * _NEG
    merged_scores_BM = jnp.concatenate([s.finished_scores, hyp_scores_BC], axis=1)
    finished_scores_BK, best_BK = jax.lax.top_k(merged_scores_BM, k)
    finished_tokens_BKN = _gather_beams(
      jnp.concatenate([s.finished_tokens, cand_tokens_BCN], axis=1), best_BK
    )
    finished_lengths_BK = _gather_beams(
      jnp.concatenate([s.finished_lengths, jnp.full((b, c), t + 1, jnp.int32)], axis=1), best_BK
    )
    finished_BK = _gather_beams(jnp.concatenate([s.finished, just_finished_BC], axis=1), best_BK)

    # Early-stop heuristic: can the best running beam still beat the worst
    # finished hypothesis? (Unfilled slots count as -1e9.)
    best_running_B1 = running_scores_BK[:, :1] / scoring.bound_N[t]
    worst_finished_BK = jnp.where(
      finished_BK, jnp.min(finished_scores_BK, axis=1, keepdims=True), _NEG
    )
    improvable_B = s.improvable & jnp.any(best_running_B1 > worst_finished_BK, axis=1)
    alive = (
      jnp.any(improvable_B) & ~jnp.all(stops_BC) & ~(jnp.all(finished_BK) & scoring.stop_when_full)
    )

    # The model runs only if another step follows: no wasted call after the last.
    def advance():
      reordered = reorder_cache(s.carry, source_beam_BK)
      tokens = jax.lax.dynamic_index_in_dim(running_tokens_BKN, t, axis=2, keepdims=False)
      logits, new_carry = step_fn(reordered, tokens.reshape(bk))
      return logits.astype(jnp.float32), new_carry

    logits, carry = jax.lax.cond(alive, advance, lambda: (s.logits, s.carry))
    return BeamState(
      step=t + 1,
      alive=alive,
      running_tokens=running_tokens_BKN,
      running_scores=running_scores_BK,
      finished_tokens=finished_tokens_BKN,
      finished_scores=finished_scores_BK,
      finished_lengths=finished_lengths_BK,
      finished=finished_BK,
      improvable=improvable_B,
      logits=logits,
      carry=carry,
    )

  return jax.lax.while_loop(lambda s: s.alive & (s.step < n), body, state)


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Beam(DecodeSpec):
  """Beam search's spec: the best of `num_beams` beams per prompt, as transformers'
  `generate(num_beams=K)`. Decoded.scores: f32 [B] sum_logprob / lengths ** length_penalty
  (transformers' sequences_scores).

  num_beams: K; 1 is greedy decoding.
  length_penalty: scores are sum_logprob / generated_len ** length_penalty; > 0 favours
    longer hypotheses, < 0 shorter ones.
  early_stopping: True: a row stops once it has K finished hypotheses; False: once its best
    running beam, scored at the current length, cannot beat its worst finished one;
    "never": as False, but scored at N tokens when length_penalty > 0 (the canonical beam
    search).
  The length penalty and early stopping reach the loop traced (`knobs`), as do the EOS and
  pad ids: they are left out of the spec's equality, so changing them does not recompile.
  """

  num_beams: int = 4
  length_penalty: float = dataclasses.field(default=1.0, compare=False)
  early_stopping: bool | str = dataclasses.field(default=False, compare=False)

  def check_settings(self) -> None:
    if not (_is_int(self.num_beams) and self.num_beams >= 1):
      raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
    lp = self.length_penalty
    if isinstance(lp, (bool, np.bool_)) or not (
      isinstance(lp, (int, float, np.integer, np.floating)) and np.isfinite(lp)
    ):
      raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
    if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
      raise ValueError(
        f'early_stopping must be True, False or "never", got {self.early_stopping!r}'
      )

  def knobs(self, max_new_tokens: int) -> BeamScoring:
    return BeamScoring.create(
      max_new_tokens,
      float(self.length_penalty),
      "never" if self.early_stopping == "never" else bool(self.early_stopping),
    )

  def run(self, models, params, inputs, rng, knobs, *, max_new_tokens, vocab):
    # One prefill per prompt; its logits and cache are then copied to the K beams.
    (first_logits_BV,), (cache,) = prefill(models, params, inputs)
    expand = lambda x: jnp.repeat(x, self.num_beams, axis=0)
    s = beam_search_loop(
      next_token_fn(models[0], params[0]),
      expand(first_logits_BV),
      jax.tree.map(expand, cache),
      num_beams=self.num_beams,
      max_new_tokens=max_new_tokens,
      eos_ids_E=inputs.stops_E,
      scoring=knobs,
      pad_id=inputs.pad_id,
    )
    return {
      "tokens": s.finished_tokens[:, 0],
      "lengths": s.finished_lengths[:, 0],
      "scores": s.finished_scores[:, 0],
    }

  def finish(self, out, rows) -> Decoded:
    return Decoded(out["tokens"], out["lengths"], {}, {}, {}, self, scores=out["scores"])


def beam_search(
  model,
  params,
  input_ids,
  attention_mask=None,
  *,
  num_beams: int,
  length_penalty: float = 1.0,
  early_stopping: bool | str = False,
  **request,
) -> Decoded:
  """`decode(Beam(num_beams, length_penalty, early_stopping), model, params, ...)`.

  eos_id: id(s) that end a hypothesis; None: every hypothesis runs N tokens. pad_id fills
  the slots after a hypothesis' EOS. Returns Decoded with tokens int32 [B, N], lengths
  int32 [B] and scores f32 [B]. Request arguments (max_new_tokens, eos_id, stop_ids, pad_id, rng, prompt_buckets, extra_inputs,
  mesh, ...) as `l2s_jax.decoding.decode`."""
  spec = Beam(num_beams, length_penalty, early_stopping)
  return decode(spec, model, params, input_ids, attention_mask, **request)
