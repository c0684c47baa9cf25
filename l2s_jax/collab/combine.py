"""Token-level collaboration of models that decode the same text together.

Every model reads the prompt and every chosen token (each with its own KV
cache); at each step a *combiner* maps their next-token logits to the logits
the sampler draws from. It plugs into the decoding loop's one hook
(`logits_processor`), so all of it runs in the same compiled while_loop as
plain generation.

Models are always ordered (LLM, SLM, ...). Logits are log-softmaxed first
(each model's scores are log-probabilities), and cut to the shared
vocabulary (`decoding.vocab`).

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

from l2s_jax.decoding.front import decode
from l2s_jax.decoding.loop import sample_loop
from l2s_jax.decoding.request import validate_generation_args
from l2s_jax.decoding.sampling import Greedy, Sampler, argmax
from l2s_jax.decoding.spec import Decoded, DecodeSpec, SpecError, extend, prefill
from l2s_jax.decoding.vocab import cut

Array = jax.Array
NEG_INF = -jnp.inf

ROUTERS = ("never", "always", "top1", "margin", "entropy", "svm")
MARGIN_FORMS = ("difference", "half")  # margin router: p1 - p2, or FS-GEN's (p1 - p2) / 2
CONTRASTIVE_FORMS = ("fsgen", "li")
TOP_RECORDED = 8  # the small model's top-k probabilities a run records (SVM features)


def threshold_range(kind: str, margin_form: str = "difference") -> tuple[float, float]:
  """[low, high] of a router's threshold: top1 a probability, margin a difference of two
  (half as wide in FS-GEN's (p1 - p2) / 2 form), entropy in nats."""
  if kind == "entropy":
    return 0.0, float("inf")
  return 0.0, 0.5 if kind == "margin" and margin_form == "half" else 1.0


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
      raise SpecError(
        "contrastive alpha", "{name}=%s must be in (0, 1] (the plausibility cut)" % (self.alpha,)
      )
    if self.form not in CONTRASTIVE_FORMS:
      raise SpecError(
        "contrastive form", "{name} %r: use %s" % (self.form, " or ".join(CONTRASTIVE_FORMS))
      )

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
  margin_form: str = "difference"  # difference: p1 - p2 | half: (p1 - p2) / 2

  def validate(self) -> None:
    """The router's own rules (the svm router's model is checked where it is given)."""
    if self.kind not in ROUTERS:
      raise SpecError("router kind", "{name} %r: use one of %s" % (self.kind, ", ".join(ROUTERS)))
    if self.margin_form not in MARGIN_FORMS:
      raise SpecError(
        "router margin_form",
        "{name} %r: use one of %s" % (self.margin_form, ", ".join(MARGIN_FORMS)),
      )
    if self.kind in ("top1", "margin", "entropy"):
      low, high = threshold_range(self.kind, self.margin_form)
      t = self.threshold
      if self.kind == "entropy" and t < low:
        raise SpecError("router threshold", "{name}=%s: an entropy in nats, >= 0" % (t,))
      if not low <= t <= high:
        raise SpecError(
          "router threshold",
          "{name}=%s is a probability for router %r: it must be "
          "in [%g, %g]" % (t, self.kind, low, high),
        )

  def check_model(self) -> None:
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
    if self.kind == "top1":
      return jnp.exp(jnp.max(lp_s, axis=-1)) < self.threshold
    margin = jnp.exp(jnp.max(lp_s, axis=-1)) - jnp.exp(second_largest(lp_s))
    return (margin / 2 if self.margin_form == "half" else margin) < self.threshold

  def __call__(self, logp):
    return jnp.where(self.route(logp)[:, None], logp[0], logp[1])


def second_largest(x_BV: Array) -> Array:
  """[B]: each row's second largest value (the largest again when it is there twice), as
  `lax.top_k(x, 2)[0][:, 1]`, from reductions alone: over a vocabulary split across chips
  each is an all-reduce of one number per row, where top_k gathered every chip's best."""
  first_B = argmax(x_BV)
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  return jnp.max(jnp.where(iota == first_B[:, None], -jnp.inf, x_BV), axis=-1)


def log_probs(logits_BV: Array, vocab: int) -> Array:
  """A model's next-token log-probs over the shared vocabulary, float32."""
  return jax.nn.log_softmax(cut(logits_BV, vocab).astype(jnp.float32), axis=-1)


def collab_trace(b: int, n: int, vocab: int) -> dict:
  """Empty per-token records [B, N, ...] of a collaborative loop."""
  zeros = jnp.zeros((b, n), jnp.int32)
  return {
    "large_used": jnp.zeros((b, n), bool),
    "small_choice": zeros,
    "large_choice": zeros,
    "small_top": jnp.zeros((b, n, min(TOP_RECORDED, vocab)), jnp.float32),
  }


def collab_stats(out, rows: int) -> tuple[dict, dict]:
  """(per-row counts, per-token trace) of a collaborative loop's host arrays."""
  tokens, lengths = out["tokens"], out["lengths"]
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  trace = {
    k: out[k] for k in ("large_used", "small_choice", "large_choice", "small_top") if k in out
  }
  stats = {
    "generated": lengths,
    "large_used": (out["large_used"] & valid).sum(1),
    "differs": ((tokens != out["small_choice"]) & valid).sum(1),
  }
  return stats, trace


def collab_summary(s: dict) -> dict:
  generated = int(s["generated"])
  return {
    "large_call_rate": int(s["large_used"]) / max(generated, 1),
    # FS-GEN: the share of tokens unlike the small model's own greedy choice.
    "collaboration_frequency": int(s["differs"]) / max(generated, 1),
    "generated_tokens": generated,
  }


@dataclasses.dataclass(frozen=True)
class Combined(DecodeSpec):
  """Token-level collaboration: every model reads every chosen token, and `combiner` maps
  their next-token log-probs to the logits `sampler` draws from. Models (large, small) for
  Contrastive and Router, (large, small tuned, small base) for Proxy.

  Decoded.trace: large_used [B, N] (the large model took part in the choice), small_choice /
  large_choice [B, N] (each one's own greedy token), small_top [B, N, K] (the small model's
  top-K probabilities, sorted; K <= 8).
  """

  combiner: Combiner = Contrastive()
  sampler: Sampler = Greedy()
  min_new_tokens: int = 0

  @property
  def num_models(self) -> int:
    return self.combiner.num_models

  @property
  def model_names(self) -> tuple[str, ...]:
    return ("large", "small") if self.num_models == 2 else ("large", "small tuned", "small base")

  def check_settings(self) -> None:
    if not isinstance(self.combiner, Combiner):
      raise ValueError(f"combiner must be an l2s_jax.collab Combiner, got {self.combiner!r}")
    self.combiner.validate()

  def validate(self, max_new_tokens: int) -> None:
    self.check_settings()
    if isinstance(self.combiner, Router):
      self.combiner.check_model()
    validate_generation_args(max_new_tokens, self.min_new_tokens, self.sampler)

  def run(self, models, params, inputs, rng, knobs, *, max_new_tokens, vocab):
    b, n = inputs.ids.shape[0], max_new_tokens
    firsts, caches = prefill(models, params, inputs)
    firsts = [log_probs(f, vocab) for f in firsts]
    combiner = self.combiner
    k = min(TOP_RECORDED, vocab)
    carry = {
      "caches": tuple(caches),
      "logp": tuple(firsts),
      "t": jnp.zeros((), jnp.int32),
      **collab_trace(b, n, vocab),
    }

    def record(carry):
      logp, t = carry["logp"], carry["t"]
      put = lambda buf, x: jax.lax.dynamic_update_slice(
        buf, x[:, None].astype(buf.dtype), (0, t) + (0,) * (buf.ndim - 2)
      )
      return {
        **carry,
        "large_used": put(carry["large_used"], combiner.route(logp)),
        "small_choice": put(carry["small_choice"], argmax(logp[1])),
        "large_choice": put(carry["large_choice"], argmax(logp[0])),
        "small_top": put(carry["small_top"], jnp.exp(jax.lax.top_k(logp[1], k)[0])),
      }

    def step_fn(carry, token_B):
      carry = record(carry)
      new_logp, new_caches = [], []
      for model, p, cache in zip(models, params, carry["caches"]):
        logits, cache = extend(model, p, token_B[:, None], cache)
        new_logp.append(log_probs(logits[:, -1], vocab))
        new_caches.append(cache)
      return new_logp[0], {
        **carry,
        "caches": tuple(new_caches),
        "logp": tuple(new_logp),
        "t": carry["t"] + 1,
      }

    def processor(logits_BV, state):
      return combiner(state.carry["logp"])

    state = sample_loop(
      self, step_fn, firsts[0], carry, rng, inputs, max_new_tokens=n, logits_processor=processor
    )
    c = state.carry
    return {
      "tokens": state.tokens,
      "lengths": state.lengths,
      **{k: c[k] for k in ("large_used", "small_choice", "large_choice", "small_top")},
    }

  def finish(self, out, rows) -> Decoded:
    stats, trace = collab_stats(out, rows)
    return Decoded(out["tokens"], out["lengths"], stats, {}, trace, self)

  def summarize(self, stats, batch_stats) -> dict:
    return collab_summary(stats)


def collab_generate(
  models: Sequence,
  params: Sequence,
  input_ids,
  attention_mask=None,
  *,
  combiner: Combiner,
  sampler: Sampler = Greedy(),
  min_new_tokens: int = 0,
  eos_id=None,
  **request,
) -> Decoded:
  """`decode(Combined(combiner, sampler, min_new_tokens), models, params, ...)`.
  Request arguments (max_new_tokens, eos_id, stop_ids, pad_id, rng, prompt_buckets,
  extra_inputs, mesh, ...) as `l2s_jax.decoding.decode`."""
  spec = Combined(combiner, sampler, min_new_tokens)
  return decode(spec, models, params, input_ids, attention_mask, eos_id=eos_id, **request)
