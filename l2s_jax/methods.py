"""Decoding methods from `config.decode.method`: what `eval.py` runs on each batch.

  greedy | sample      generate(), Greedy or Temperature -> TopK -> TopP
  beam                 beam_search()
  speculative          System 1 (the configured model) drafts, System 2 (`config.collab`)
                       verifies; the output follows System 2 (its greedy output, or its
                       sampling distribution)
  contrastive | proxy  collab_generate() with System 2 and System 1 (and, for proxy, the
                       small model before tuning, `config.collab.base`) combined per token
  routed               routed_generate(): System 1 generates, System 2 chooses the tokens
                       where the router (`collab.router`) fires and runs only then

System 1 may be an LLM-to-SLM hybrid (its LLM encoder runs once, at prefill),
and so may System 2 when it is a trained workdir (it then reads the prompt ids
through the same tokenizer). Each method maps prompts (with System 1's extra
inputs) to tokens, lengths and per-row statistics, and sums statistics over
rows into the numbers the eval JSON reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from l2s_jax import assemble, quantize
from l2s_jax.collab import svm_router
from l2s_jax.collab.combine import Contrastive, Proxy, Router, collab_generate
from l2s_jax.collab.routed import routed_generate
from l2s_jax.collab.speculative import speculative_generate
from l2s_jax.collab.vocab import common_vocab
from l2s_jax.decoding import Greedy, Temperature, TopK, TopP, beam_search, chain, generate
from l2s_jax.decoding.request import cache_length
from l2s_jax.models import LLMToSLM, is_encoder_decoder


@dataclasses.dataclass(frozen=True)
class Decoded:
  tokens: np.ndarray                 # int32 [B, N]
  lengths: np.ndarray                # int32 [B]
  stats: dict[str, np.ndarray]       # per row: [B] or [B, ...] counts


def sampler_from(decode: ml_collections.ConfigDict):
  """Greedy for temperature 0, else Temperature -> TopK -> TopP as configured."""
  if decode.temperature == 0:
    return Greedy()
  parts = [Temperature(float(decode.temperature))]
  if decode.top_k:
    parts.append(TopK(int(decode.top_k)))
  if decode.top_p < 1.0:
    parts.append(TopP(float(decode.top_p)))
  return chain(*parts)


def llm_inputs(model, ids, mask) -> dict:
  """A System 2 hybrid reads the prompt ids through its LLM encoder as well (one tokenizer)."""
  if isinstance(model, LLMToSLM):
    return {"llm_input_ids": ids, "llm_attention_mask": mask}
  return {}


@dataclasses.dataclass
class Method:
  """Common settings; subclasses decode."""
  name: str
  config: Any
  model: Any                         # System 1
  params: Any
  eos: int
  pad: int
  mesh: Any

  @property
  def decode(self):
    return self.config.decode

  def _common(self) -> dict:
    d = self.decode
    return dict(max_new_tokens=d.max_new_tokens, eos_id=self.eos, stop_ids=tuple(d.stop_ids),
                pad_id=self.pad, prompt_buckets=self.config.data.prompt_buckets, mesh=self.mesh)

  def summary(self, stats: dict[str, np.ndarray]) -> dict:
    return {}


class Plain(Method):
  def __call__(self, ids, mask, extra, rng) -> Decoded:
    out = generate(self.model, self.params, ids, mask, sampler=sampler_from(self.decode),
                   rng=rng, min_new_tokens=self.decode.min_new_tokens, extra_inputs=extra,
                   **self._common())
    return Decoded(out.tokens, out.lengths, {})


class Beam(Method):
  def __call__(self, ids, mask, extra, rng) -> Decoded:
    common = self._common()
    stop = common.pop("stop_ids")
    common["eos_id"] = [self.eos, *stop]
    out = beam_search(self.model, self.params, ids, mask, num_beams=self.decode.num_beams,
                      length_penalty=self.decode.length_penalty, extra_inputs=extra, **common)
    return Decoded(out.tokens, out.lengths, {})


@dataclasses.dataclass
class Speculative(Method):
  large: Any = None                  # (model, params) of System 2, the verifier

  def __call__(self, ids, mask, extra, rng) -> Decoded:
    llm, llm_params = self.large
    co = self.config.collab
    out = speculative_generate(llm, llm_params, self.model, self.params, ids, mask,
                               gamma=co.gamma, adaptive=co.adaptive, rollback=co.rollback,
                               sampler=sampler_from(self.decode), rng=rng,
                               llm_extra_inputs=llm_inputs(llm, ids, mask),
                               slm_extra_inputs=extra, **self._common())
    stats = {"drafted": out.drafted, "accepted": out.accepted, "rejected": out.rejected,
             "llm_calls": out.llm_calls, "generated": out.lengths,
             "reached_at": out.reached_at, "accepted_at": out.accepted_at}
    return Decoded(out.tokens, out.lengths, stats)

  def summary(self, s: dict[str, np.ndarray]) -> dict:
    accepted, rejected = int(s["accepted"].sum()), int(s["rejected"].sum())
    generated, calls = int(s["generated"].sum()), int(s["llm_calls"].sum())
    reached, kept = s["reached_at"].sum(0), s["accepted_at"].sum(0)
    return {
        # alpha, from per-position acceptance: kept / (kept + rejections)
        "acceptance_rate": accepted / max(accepted + rejected, 1),
        "acceptance_by_position": [float(a / r) if r else None for a, r in zip(kept, reached)],
        "draft_acceptance": accepted / max(int(s["drafted"].sum()), 1),
        "tokens_per_llm_call": generated / max(calls, 1),
        "llm_call_rate": calls / max(generated, 1),         # System 2 passes per token
        # Tokens System 2 put in place of a rejected draft, per generated token.
        "correction_rate": rejected / max(generated, 1),
        "generated_tokens": generated, "llm_calls": calls, "drafted": int(s["drafted"].sum()),
        "accepted": accepted, "rejected": rejected}


@dataclasses.dataclass
class Collaborative(Method):
  """contrastive, proxy, routed: the models' log-probs combined at every step."""
  partners: tuple = ()               # ((model, params), ...) before and after System 1
  combiner: Any = None

  def __call__(self, ids, mask, extra, rng) -> Decoded:
    (llm, llm_params), *rest = self.partners
    models = [llm, self.model] + [m for m, _ in rest]
    params = [llm_params, self.params] + [p for _, p in rest]
    extras = [llm_inputs(llm, ids, mask), extra] + [llm_inputs(m, ids, mask) for m, _ in rest]
    out = collab_generate(models, params, ids, mask, combiner=self.combiner,
                          sampler=sampler_from(self.decode), rng=rng, extra_inputs=extras,
                          min_new_tokens=self.decode.min_new_tokens, **self._common())
    valid = out.valid()
    stats = {"generated": out.lengths, "llm_used": (out.llm_used & valid).sum(1),
             "differs": ((out.tokens != out.slm_choice) & valid).sum(1)}
    return Decoded(out.tokens, out.lengths, stats)

  def summary(self, s: dict[str, np.ndarray]) -> dict:
    generated = int(s["generated"].sum())
    return {"llm_call_rate": int(s["llm_used"].sum()) / max(generated, 1),
            # FS-GEN: the share of tokens unlike System 1's own greedy choice.
            "collaboration_frequency": int(s["differs"].sum()) / max(generated, 1),
            "generated_tokens": generated}


@dataclasses.dataclass
class Routed(Method):
  """routed: System 2 runs only at the steps where a row's router fires."""
  large: Any = None                  # (model, params) of System 2
  router: Any = None

  def __call__(self, ids, mask, extra, rng) -> Decoded:
    llm, llm_params = self.large
    out = routed_generate([llm, self.model], [llm_params, self.params], ids, mask,
                          router=self.router, chunk=self.config.collab.router_chunk,
                          sampler=sampler_from(self.decode), rng=rng,
                          extra_inputs=[llm_inputs(llm, ids, mask), extra],
                          min_new_tokens=self.decode.min_new_tokens, **self._common())
    valid = out.valid()
    steps = int(out.lengths.max())
    b = out.tokens.shape[0]
    # Per-batch figures are spread over the batch's rows, so that sums over rows add up.
    share = np.full((b,), 1.0 / b)
    stats = {"generated": out.lengths, "llm_used": (out.llm_used & valid).sum(1),
             "differs": ((out.tokens != out.slm_choice) & valid).sum(1),
             "batch_steps": share * steps, "batch_calls": share * out.batch_calls[:steps].sum(),
             "llm_tokens_read": share * out.llm_tokens_read}
    return Decoded(out.tokens, out.lengths, stats)

  def summary(self, s: dict[str, np.ndarray]) -> dict:
    generated = int(s["generated"].sum())
    steps = float(s["batch_steps"].sum())
    return {"llm_call_rate": int(s["llm_used"].sum()) / max(generated, 1),
            # The batch runs System 2 when any of its rows fires.
            "batch_call_rate": float(s["batch_calls"].sum()) / max(steps, 1.0),
            "llm_tokens_read_per_token": float(s["llm_tokens_read"].sum()) / max(generated, 1),
            "collaboration_frequency": int(s["differs"].sum()) / max(generated, 1),
            "generated_tokens": generated}


def router_from(co: ml_collections.ConfigDict) -> Router:
  """The router `config.collab` describes (an svm router read from its file)."""
  if co.router == "svm":
    return Router("svm", co.router_threshold, svm=svm_router.load(co.router_svm))
  return Router(co.router, co.router_threshold, margin_form=co.router_margin)


def _check_positions(config, models: dict, budget: int) -> None:
  """Prompts of up to data.max_prompt_len tokens and the new ones must fit every model."""
  for name, model in models.items():
    try:
      cache_length(model, config.data.max_prompt_len, budget)
    except ValueError as e:
      raise ValueError(f"{name}: data.max_prompt_len={config.data.max_prompt_len} and "
                       f"decode.max_new_tokens={config.decode.max_new_tokens} do not fit: "
                       f"{e}") from e


def for_model(config: ml_collections.ConfigDict, model, params, pipeline, mesh=None) -> Method:
  """greedy / sample / beam (as `config.decode` says) with a given model and params."""
  cls = Beam if config.decode.method == "beam" else Plain
  params = quantize.quantize_weights(params, config.decode.weights)
  return cls(name=config.decode.method, config=config, model=model, params=params,
             eos=pipeline.tokenizer.eos_id, pad=pipeline.tokenizer.pad_id, mesh=mesh)


def build(config: ml_collections.ConfigDict, run: assemble.Assembly) -> Method:
  """The method `config.decode.method` names, over the assembled run (and System 2)."""
  d = config.decode
  tok = run.pipeline.tokenizer
  if d.method in ("greedy", "sample", "beam"):
    _check_positions(config, {"the model": run.model}, d.max_new_tokens)
    return for_model(config, run.compute_model, run.params, run.pipeline, run.mesh)
  # Weights are quantized (decode.weights) once every check below has passed.
  weights = lambda params: quantize.quantize_weights(params, d.weights)
  common = dict(name=d.method, config=config, model=run.compute_model,
                eos=tok.eos_id, pad=tok.pad_id, mesh=run.mesh)
  partners = [assemble.load_partner(config, config.collab, "collab", run)]
  if d.method == "proxy":
    partners.append(assemble.load_partner(config, config.collab.base, "collab.base", run))
  names = ["collab (System 2)", "the configured model (System 1)", "collab.base"]
  models = [partners[0][0], run.model] + [m for m, _ in partners[1:]]
  kinds = {n: is_encoder_decoder(m) for n, m in zip(names, models)}
  if len(set(kinds.values())) > 1:
    raise ValueError("collaborative decoding needs models that read the prompt the same way "
                     f"(encoder-decoder or decoder-only): {kinds}")
  common_vocab(models, names=names[:len(models)])      # one tokenizer, or a clear error
  co = config.collab
  slack = {"speculative": co.gamma + 1, "routed": co.router_chunk}.get(d.method, 0)
  _check_positions(config, dict(zip(names, models)), d.max_new_tokens + slack)
  common["params"] = weights(run.params)
  partners = [(model, weights(params)) for model, params in partners]
  large = partners[0]
  if d.method == "speculative":
    return Speculative(**common, large=large)
  if d.method == "routed":
    return Routed(**common, large=large, router=router_from(co))
  combiner = {"contrastive": lambda: Contrastive(co.contrastive_alpha, co.contrastive_beta,
                                                 co.contrastive_form),
              "proxy": lambda: Proxy(co.proxy_alpha)}[d.method]()
  return Collaborative(**common, partners=tuple(partners), combiner=combiner)


def batch_rng(config, index: int) -> jax.Array:
  """The sampling key of the `index`-th batch: the same batches draw the same tokens."""
  return jax.random.fold_in(jax.random.PRNGKey(config.decode.seed), index)
