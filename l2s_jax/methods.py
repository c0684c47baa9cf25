"""The decoding method `config.decode.method` names, over an assembled run: what `eval.py`
runs on each batch.

The config gives the method's spec (`config_decode.spec_from_config`); this module adds the
models it decodes with. The configured model (an SLM, or an LLM-to-SLM hybrid whose LLM
encoder runs once, at prefill) is the small model; the collaborative methods decode with
the large model `config.collab` names first (and, for proxy, `config.collab.base`, the
small model before its tuning, last):

  greedy | sample | beam    (small)
  speculative | routed      (large, small)
  contrastive               (large, small)
  proxy                     (large, small tuned, small base)

A large model that is a trained hybrid reads the prompt ids through its own LLM encoder
too (one tokenizer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from l2s_jax import assemble, config_decode, quantize
from l2s_jax.collab import svm_router
from l2s_jax.decoding import Decoded, DecodeSpec, decode, lower
from l2s_jax.decoding.request import cache_length
from l2s_jax.decoding.vocab import common_vocab
from l2s_jax.models import is_encoder_decoder
from l2s_jax.models.adapters import adapter_for


@dataclasses.dataclass
class Method:
  """A spec with its models: decodes batches of prompts."""

  name: str
  config: Any
  spec: DecodeSpec
  models: tuple  # (large, small, ...) or (the model,)
  params: tuple
  small: int  # the configured model's position in `models`
  eos: int
  pad: int
  mesh: Any

  @property
  def model(self):
    """The configured model."""
    return self.models[self.small]

  def __call__(self, ids, mask, extra: dict, rng) -> Decoded:
    """Decodes [B, P] prompts; `extra`: the configured model's extra prefill inputs."""
    return decode(
      self.spec, self.models, self.params, ids, mask, rng=rng, **self._request(ids, mask, extra)
    )

  def lower(self, ids, mask, extra: dict, *, prefill_only: bool = False):
    """The program `__call__` runs, lowered (`decoding.lower`): ahead of time, `ids` [B, P]
    and `extra` are ShapeDtypeStructs and the params too. `prefill_only`: its prefill."""
    return lower(
      self.spec,
      self.models,
      self.params,
      ids,
      mask,
      prefill_only=prefill_only,
      **self._request(ids, mask, extra),
    )

  def _request(self, ids, mask, extra: dict) -> dict:
    d = self.config.decode
    extras = [
      extra if i == self.small else adapter_for(m).partner_inputs(ids, mask)
      for i, m in enumerate(self.models)
    ]
    # Beam search ends a hypothesis at any of its EOS ids: the stop ids are EOS ids there.
    eos, stops = (
      ([self.eos, *d.stop_ids], ()) if d.method == "beam" else (self.eos, tuple(d.stop_ids))
    )
    return dict(
      max_new_tokens=d.max_new_tokens,
      eos_id=eos,
      stop_ids=stops,
      pad_id=self.pad,
      prompt_buckets=self.config.data.prompt_buckets,
      extra_inputs=extras,
      mesh=self.mesh,
    )

  def summary(self, stats: dict, batch_stats: dict) -> dict:
    """The report numbers of counts summed over rows and batches."""
    return self.spec.summarize(stats, batch_stats)


def _check_positions(config, models: dict, budget: int) -> None:
  """Prompts of up to data.max_prompt_len tokens and the new ones must fit every model."""
  for name, model in models.items():
    try:
      cache_length(model, config.data.max_prompt_len, budget)
    except ValueError as e:
      raise ValueError(
        f"{name}: data.max_prompt_len={config.data.max_prompt_len} and "
        f"decode.max_new_tokens={config.decode.max_new_tokens} do not fit: "
        f"{e}"
      ) from e


def _special_ids(pipeline, model) -> tuple[int, int]:
  """(eos, pad) ids: the tokenizer's; without data (a program compiled from shapes alone),
  the model config's EOS (1 if it names none) and pad 0, constants of the program."""
  if pipeline is not None:
    return pipeline.tokenizer.eos_id, pipeline.tokenizer.pad_id
  config = adapter_for(model).trained.config
  eos = getattr(config, "eos_token_id", None)
  return (1 if eos is None else int(eos)), 0


def for_model(config: ml_collections.ConfigDict, model, params, pipeline, mesh=None) -> Method:
  """greedy / sample / beam (as `config.decode` says) with a given model and params
  (`pipeline` None: from shapes alone, `_special_ids`)."""
  params = quantize.quantize_weights(params, config.decode.weights)
  eos, pad = _special_ids(pipeline, model)
  return Method(
    config.decode.method,
    config,
    config_decode.spec_from_config(config),
    (model,),
    (params,),
    0,
    eos,
    pad,
    mesh,
  )


def build(
  config: ml_collections.ConfigDict, run: assemble.Assembly, partner=assemble.load_partner
) -> Method:
  """The method `config.decode.method` names, over the assembled run (and the large model).
  `partner(config, group, name, run)`: (model, params) of a collaborating model group;
  `assemble.abstract_partner` for a run known by its shapes alone."""
  d, co = config.decode, config.collab
  if d.method not in config_decode.COLLAB_METHODS:
    _check_positions(config, {"the model": run.model}, d.max_new_tokens)
    return for_model(config, run.compute_model, run.params, run.pipeline, run.mesh)
  svm = svm_router.load(co.router_svm) if d.method == "routed" and co.router == "svm" else None
  spec = config_decode.spec_from_config(config, svm)
  partners = [partner(config, co, "collab", run)]
  if d.method == "proxy":
    partners.append(partner(config, co.base, "collab.base", run))
  names = ["collab (the large model)", "the configured model (the small model)", "collab.base"]
  # (model in the compute dtype, params) in order: large, small (the configured one), base.
  pairs = [partners[0], (run.compute_model, run.params), *partners[1:]]
  models = [m for m, _ in pairs]
  kinds = {n: is_encoder_decoder(m) for n, m in zip(names, models)}
  if len(set(kinds.values())) > 1:
    raise ValueError(
      "collaborative decoding needs models that read the prompt the same way "
      f"(encoder-decoder or decoder-only): {kinds}"
    )
  common_vocab(models, names=names[: len(models)])  # one tokenizer, or a clear error
  _check_positions(config, dict(zip(names, models)), d.max_new_tokens + spec.cache_slack)
  # Weights are quantized (decode.weights) once every check above has passed.
  params = [quantize.quantize_weights(p, d.weights) for _, p in pairs]
  eos, pad = _special_ids(run.pipeline, run.model)
  return Method(d.method, config, spec, tuple(models), tuple(params), 1, eos, pad, run.mesh)


def batch_rng(config, index: int) -> jax.Array:
  """The sampling key of the `index`-th batch: the same batches draw the same tokens."""
  return jax.random.fold_in(jax.random.PRNGKey(config.decode.seed), index)
