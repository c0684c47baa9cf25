"""Token-level collaboration of models that decode the same text together.

Every model reads the prompt and every chosen token (each with its own KV
cache); at each step a *combiner* maps their next-token logits to the logits
the sampler draws from. It plugs into the decoding loop's one hook
(`logits_processor`), so all of it runs in the same compiled while_loop as
plain generation.

Models are always ordered (LLM, SLM, ...). Logits are log-softmaxed first
(each model's scores are log-probabilities), and cut to the shared
vocabulary (`collab.vocab`).

Combiners (FS-GEN, Zhang et al. 2024, section 2):
  Contrastive   contrastive decoding (Li et al. 2023) over the plausible set
                V_a = {x : p_L(x) >= alpha max p_L}; two score conventions:
                  form="li":    log p_L - beta log p_S
                  form="fsgen": log p_S + beta (log p_L - log p_S)
                                (FS-GEN's code, beta = 0.5 by default; it is
                                the "li" form's ranking only when beta > 1.)
  Proxy         proxy tuning / emulated fine-tuning, three models (LLM base,
                SLM tuned, SLM base): log p_L + alpha (log p_St - log p_Sb).
  Router        the SLM generates; per token a rule on the SLM's distribution
                decides whether the LLM's choice is used instead:
                never, always, top1 (p1 < t), margin (p1 - p2 < t, or
                FS-GEN's (p1 - p2) / 2 < t with margin_form="half"),
                entropy (H(p_S) > t nats).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.collab.vocab import common_vocab, cut
from l2s_jax.config_schema import MARGIN_FORMS, ROUTERS, TOP_RECORDED
from l2s_jax.decoding.loop import decode_loop
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS
from l2s_jax.decoding.request import prepare_request, validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler

Array = jax.Array
NEG_INF = -jnp.inf


class Combiner:
  """Maps the models' log-probs (a tuple of [B, V]) to the logits to sample from."""

  num_models: int = 2

  def validate(self) -> None:
    pass

  def __call__(self, logp: tuple[Array, ...]) -> Array:
    raise NotImplementedError

  def route(self, logp: tuple[Array, ...]) -> Array:
    """[B] bool: whether the LLM takes part in this step's choice."""
    return jnp.ones(logp[0].shape[:1], bool)


@dataclasses.dataclass(frozen=True)
class Contrastive(Combiner):
  alpha: float = 0.1
  beta: float = 0.5
  form: str = "fsgen"

  def validate(self) -> None:
    if not 0.0 < self.alpha <= 1.0:
      raise ValueError(f"contrastive alpha (plausibility cut) must be in (0, 1], got {self.alpha}")
    if self.form not in ("li", "fsgen"):
      raise ValueError(f"contrastive form {self.form!r}: use 'li' or 'fsgen'")

  def __call__(self, logp):
    lp_l, lp_s = logp
    plausible = lp_l >= math.log(self.alpha) + jnp.max(lp_l, axis=-1, keepdims=True)
    if self.form == "li":
      score = lp_l - self.beta * lp_s
    else:
      score = lp_s + self.beta * (lp_l - lp_s)
    return jnp.where(plausible, score, NEG_INF)


@dataclasses.dataclass(frozen=True)
class Proxy(Combiner):
  """Models: (LLM base, SLM tuned, SLM base)."""
  alpha: float = 1.0
  num_models: int = 3

  def __call__(self, logp):
    lp_l, lp_tuned, lp_base = logp
    return lp_l + self.alpha * (lp_tuned - lp_base)




@dataclasses.dataclass(frozen=True)
class Router(Combiner):
  """Models: (LLM, SLM). threshold: p1 < t (top1), p1 - p2 < t (margin; (p1 - p2) / 2 < t
  with margin_form "half", FS-GEN's code), H > t (entropy);
  svm: FS-GEN's learned router (`l2s_jax.collab.svm_router.SvmRouter`) over the SLM's top-k
  probabilities, the LLM called where its decision function is > 0."""
  kind: str = "top1"
  threshold: float = 0.5
  svm: object = None
  margin_form: str = "difference"     # difference: p1 - p2 | half: (p1 - p2) / 2

  def validate(self) -> None:
    if self.kind not in ROUTERS:
      raise ValueError(f"router kind {self.kind!r}: use one of {ROUTERS}")
    if self.margin_form not in MARGIN_FORMS:
      raise ValueError(f"router margin_form {self.margin_form!r}: use one of {MARGIN_FORMS}")
    if (self.kind == "svm") != (self.svm is not None):
      raise ValueError("router kind 'svm' takes a trained SvmRouter (svm=...), and only it")

  def route(self, logp):
    lp_s = logp[1]
    b = lp_s.shape[0]
    if self.kind == "never":
      return jnp.zeros((b,), bool)
    if self.kind == "always":
      return jnp.ones((b,), bool)
    if self.kind == "svm":
      return self.svm.decide(lp_s)
    if self.kind == "entropy":
      p = jnp.exp(lp_s)
      entropy = -jnp.sum(jnp.where(p > 0, p * lp_s, 0.0), axis=-1)
      return entropy > self.threshold
    top2 = jnp.exp(jax.lax.top_k(lp_s, 2)[0])
    if self.kind == "top1":
      return top2[:, 0] < self.threshold
    margin = top2[:, 0] - top2[:, 1]
    return (margin / 2 if self.margin_form == "half" else margin) < self.threshold

  def __call__(self, logp):
    return jnp.where(self.route(logp)[:, None], logp[0], logp[1])


@dataclasses.dataclass(frozen=True)
class CollabOutput:
  tokens: np.ndarray        # int32 [B, N]: the chosen tokens, pad after each row's stop token
  lengths: np.ndarray       # int32 [B]
  llm_used: np.ndarray      # bool [B, N]: the LLM took part in the choice (routed)
  slm_choice: np.ndarray    # int32 [B, N]: the SLM's own greedy token at that step
  llm_choice: np.ndarray    # int32 [B, N]: the LLM's own greedy token at that step
  slm_top: np.ndarray = None  # f32 [B, N, K]: the SLM's top-K probabilities, sorted (K <= 8)

  def valid(self) -> np.ndarray:
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

  @property
  def call_rate(self) -> float:
    """Share of generated tokens for which the LLM was consulted."""
    v = self.valid()
    return float(self.llm_used[v].mean()) if v.any() else 0.0

  @property
  def collaboration_frequency(self) -> float:
    """Share of generated tokens that differ from the SLM's own greedy choice (FS-GEN)."""
    v = self.valid()
    return float((self.tokens != self.slm_choice)[v].mean()) if v.any() else 0.0


def prefill_all(models, params, ids, mask, cache_lens, extras, vocab):
  """Every model's prefill of the same prompts: ([B, V] log-probs cut to `vocab`, caches)."""
  logps, caches = [], []
  for model, p, length, extra in zip(models, params, cache_lens, extras):
    first, cache = model.apply({"params": p}, ids, mask, max_len=length, method=model.prefill,
                               **extra)
    logps.append(jax.nn.log_softmax(cut(first, vocab).astype(jnp.float32), axis=-1))
    caches.append(cache)
  return logps, caches


def collab_core(params, ids, mask, rng, extras, *, models, combiner, sampler, max_new_tokens,
                cache_lens, stop_ids, pad_id, vocab, min_new_tokens=0):
  """Traceable: prefill every model, then one decode loop with the combiner as its hook."""
  b, n = ids.shape[0], max_new_tokens
  firsts, caches = prefill_all(models, params, ids, mask, cache_lens, extras, vocab)
  zeros = jnp.zeros((b, n), jnp.int32)
  k = min(TOP_RECORDED, vocab)
  carry = {"caches": tuple(caches), "logp": tuple(firsts), "t": jnp.zeros((), jnp.int32),
           "llm_used": jnp.zeros((b, n), bool), "slm_choice": zeros, "llm_choice": zeros,
           "slm_top": jnp.zeros((b, n, k), jnp.float32)}

  def record(carry):
    logp, t = carry["logp"], carry["t"]
    put = lambda buf, x: jax.lax.dynamic_update_slice(
        buf, x[:, None].astype(buf.dtype), (0, t) + (0,) * (buf.ndim - 2))
    return {**carry,
            "llm_used": put(carry["llm_used"], combiner.route(logp)),
            "slm_choice": put(carry["slm_choice"], jnp.argmax(logp[1], axis=-1)),
            "llm_choice": put(carry["llm_choice"], jnp.argmax(logp[0], axis=-1)),
            "slm_top": put(carry["slm_top"], jnp.exp(jax.lax.top_k(logp[1], k)[0]))}

  def step_fn(carry, token_B):
    carry = record(carry)
    new_logp, new_caches = [], []
    for model, p, cache in zip(models, params, carry["caches"]):
      logits, cache = model.apply({"params": p}, token_B[:, None], cache, method=model.extend)
      new_logp.append(jax.nn.log_softmax(cut(logits[:, -1], vocab).astype(jnp.float32), -1))
      new_caches.append(cache)
    return new_logp[0], {**carry, "caches": tuple(new_caches), "logp": tuple(new_logp),
                         "t": carry["t"] + 1}

  def processor(logits_BV, state):
    return combiner(state.carry["logp"])

  state = decode_loop(step_fn, firsts[0], carry, rng, max_new_tokens=n, sampler=sampler,
                      stop_ids=stop_ids, pad_id=pad_id, logits_processor=processor,
                      min_new_tokens=min_new_tokens)
  c = state.carry
  return (state.tokens, state.lengths, c["llm_used"], c["slm_choice"], c["llm_choice"],
          c["slm_top"])


_COLLAB_STATIC = ("models", "combiner", "sampler", "max_new_tokens", "cache_lens", "stop_ids",
                  "pad_id", "vocab", "min_new_tokens")
_collab_jit = jax.jit(collab_core, static_argnames=_COLLAB_STATIC)


def collab_generate(models: Sequence, params: Sequence, input_ids, attention_mask=None, *,
                    combiner: Combiner, max_new_tokens: int, eos_id=None,
                    sampler: Sampler = Greedy(), rng: Array | None = None,
                    stop_ids: Sequence[int] = (), pad_id: int = 0,
                    tokenizer_size: int | None = None,
                    prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                    extra_inputs: Sequence[dict | None] | None = None,
                    mesh=None, min_new_tokens: int = 0) -> CollabOutput:
  """Generates with several models combined token by token.

  models / params: (LLM, SLM) for Contrastive and Router, (LLM base, SLM
  tuned, SLM base) for Proxy; all read the same prompts (decoder-only models
  their prompt, encoder-decoders with their own encoder).
  extra_inputs: per model, more prefill inputs (an LLM-to-SLM hybrid's LLM prompt).
  mesh: split the batch over the mesh's data axes; params are used as placed.
  """
  if len(models) != len(params):
    raise ValueError(f"{len(models)} models but {len(params)} param trees")
  if len(models) != combiner.num_models:
    raise ValueError(f"{type(combiner).__name__} combines {combiner.num_models} models, "
                     f"got {len(models)}")
  combiner.validate()
  validate_generation_args(max_new_tokens, min_new_tokens, sampler)
  names = ["LLM", "SLM"] if len(models) == 2 else ["LLM", "SLM tuned", "SLM base"]
  vocab = common_vocab(models, tokenizer_size, names=names)
  req = prepare_request(models, input_ids, attention_mask, budget=int(max_new_tokens),
                        vocab=vocab, eos_id=eos_id, stop_ids=stop_ids, pad_id=pad_id,
                        prompt_buckets=prompt_buckets, extra_inputs=extra_inputs, mesh=mesh)
  out = _collab_jit(tuple(params), req.input_ids, req.attention_mask,
                    jax.random.PRNGKey(0) if rng is None else rng, req.extra,
                    models=tuple(models), combiner=combiner, sampler=sampler,
                    max_new_tokens=int(max_new_tokens), cache_lens=req.cache_lens,
                    stop_ids=req.stop_ids, pad_id=int(pad_id), vocab=vocab,
                    min_new_tokens=int(min_new_tokens))
  tokens, lengths, used, slm_choice, llm_choice, slm_top = req.finish(*out)
  return CollabOutput(tokens=tokens, lengths=lengths, llm_used=used, slm_choice=slm_choice,
                      llm_choice=llm_choice, slm_top=slm_top)
