"""`config.decode` and `config.collab` -> a decoding method's spec; the config's checks.

The config only builds specs: each rule of a method's settings lives in its spec (the
engines' `validate`), and the config's validation calls it, naming the config field. What
stays here is what only a config can get wrong: which settings apply to which method, and
where the large model comes from.

  config.decode.method   spec
  greedy | sample        decoding.Sample(sampler from temperature / top_k / top_p)
  beam                   decoding.Beam(num_beams, length_penalty)
  speculative            collab.Speculative(collab.gamma, adaptive, rollback, sampler)
  contrastive | proxy    collab.Combined(Contrastive(...) | Proxy(collab.proxy_alpha), sampler)
  routed                 collab.Routed(Router(collab.router, ...), collab.router_chunk, sampler)
"""

from __future__ import annotations

import ml_collections

from l2s_jax.collab.combine import MARGIN_FORMS, ROUTERS, Combined, Contrastive, Proxy, Router
from l2s_jax.collab.routed import Routed
from l2s_jax.collab.speculative import Speculative
from l2s_jax.decoding import (
  Beam,
  DecodeSpec,
  Greedy,
  Sample,
  SpecError,
  Temperature,
  TopK,
  TopP,
  chain,
)

METHODS = ("greedy", "sample", "beam", "speculative", "contrastive", "proxy", "routed")
COLLAB_METHODS = ("speculative", "contrastive", "proxy", "routed")
WEIGHTS = ("stored", "int8")  # decode.weights: as stored, or int8 weight-only (qwix)

# The config field of each spec setting whose rule lives in the spec.
CONFIG_FIELDS = {
  "gamma": "collab.gamma",
  "rollback": "collab.rollback",
  "contrastive alpha": "collab.contrastive_alpha",
  "contrastive form": "collab.contrastive_form",
  "router kind": "collab.router",
  "router margin_form": "collab.router_margin",
  "router threshold": "collab.router_threshold",
  "chunk": "collab.router_chunk",
}


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


def router_from(co: ml_collections.ConfigDict, svm=None) -> Router:
  """The router `config.collab` describes; `svm`: the svm router's model, read from
  `collab.router_svm` by the caller (`collab.svm_router.load`)."""
  if co.router == "svm":
    return Router("svm", co.router_threshold, svm=svm, margin_form=co.router_margin)
  return Router(co.router, co.router_threshold, margin_form=co.router_margin)


def spec_from_config(config: ml_collections.ConfigDict, svm=None) -> DecodeSpec:
  """The spec of `config.decode.method` with its settings (not validated: see
  `validate_decode`)."""
  d, co = config.decode, config.collab
  sampler = sampler_from(d)
  if d.method in ("greedy", "sample"):
    return Sample(sampler, int(d.min_new_tokens))
  if d.method == "beam":
    return Beam(int(d.num_beams), float(d.length_penalty))
  if d.method == "speculative":
    return Speculative(co.gamma, bool(co.adaptive), co.rollback, sampler)
  if d.method == "contrastive":
    return Combined(
      Contrastive(co.contrastive_alpha, co.contrastive_beta, co.contrastive_form),
      sampler,
      int(d.min_new_tokens),
    )
  if d.method == "proxy":
    return Combined(Proxy(co.proxy_alpha), sampler, int(d.min_new_tokens))
  if d.method == "routed":
    return Routed(router_from(co, svm), co.router_chunk, sampler, int(d.min_new_tokens))
  raise ValueError(f"decode.method {d.method!r}: use one of {', '.join(METHODS)}")


def check_spec(spec: DecodeSpec) -> None:
  """The spec's own rules, errors naming the config field of the setting."""
  try:
    spec.check_settings()
  except SpecError as e:
    raise e.renamed(CONFIG_FIELDS.get(e.field, e.field)) from e


def sources(group) -> list[str]:
  """The fields of a model group that are set (exactly one of them must be)."""
  return [f for f in ("path", "preset", "workdir") if group[f]]


def check_router_margin(co: ml_collections.ConfigDict) -> None:
  if co.router_margin not in MARGIN_FORMS:
    raise ValueError(
      f"collab.router_margin {co.router_margin!r}: use one of {', '.join(MARGIN_FORMS)}"
    )


def validate_decode(config: ml_collections.ConfigDict) -> None:
  """The decoding method and its settings agree; nothing set is silently ignored."""
  d, co = config.decode, config.collab
  if d.method not in METHODS:
    raise ValueError(f"decode.method {d.method!r}: use one of {', '.join(METHODS)}")
  if d.weights not in WEIGHTS:
    raise ValueError(f"decode.weights {d.weights!r}: use one of {', '.join(WEIGHTS)}")
  if d.max_new_tokens < 1 or not 0 <= d.min_new_tokens <= d.max_new_tokens:
    raise ValueError(
      f"decode.max_new_tokens={d.max_new_tokens} must be >= 1 and "
      f"decode.min_new_tokens={d.min_new_tokens} in [0, max_new_tokens]"
    )
  if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in d.stop_ids):
    raise ValueError(f"decode.stop_ids {tuple(d.stop_ids)!r}: token ids (integers >= 0)")
  sampling = {
    k: d[k]
    for k, default in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0))
    if d[k] != default
  }
  if d.temperature < 0 or d.top_k < 0 or not 0.0 < d.top_p <= 1.0:
    raise ValueError(
      f"decode.temperature={d.temperature} must be >= 0, decode.top_k="
      f"{d.top_k} >= 0 and decode.top_p={d.top_p} in (0, 1]"
    )
  if d.method in ("greedy", "beam") and sampling:
    raise ValueError(
      f"decode.method={d.method!r} chooses tokens without sampling, so "
      f"{', '.join(f'decode.{k}={v}' for k, v in sampling.items())} would be "
      "ignored; use method 'sample' (or a collaborative method) to sample"
    )
  if (
    d.method != "greedy"
    and d.method != "beam"
    and d.temperature == 0
    and (d.top_k or d.top_p != 1.0)
  ):
    raise ValueError(
      "decode.top_k / decode.top_p filter a sampled distribution: set "
      "decode.temperature > 0 as well"
    )
  if d.method == "sample" and d.temperature <= 0:
    raise ValueError("decode.method='sample' needs decode.temperature > 0")
  if (d.method == "beam") != (d.num_beams > 1):
    raise ValueError(
      f"decode.num_beams={d.num_beams} with decode.method={d.method!r}: beam "
      "search is method 'beam' with num_beams >= 2, and no other method "
      "takes beams"
    )
  if d.min_new_tokens and d.method in ("beam", "speculative"):
    raise ValueError(f"decode.min_new_tokens is not offered by decode.method={d.method!r}")
  if d.method not in COLLAB_METHODS:
    return
  if len(sources(co)) != 1:
    raise ValueError(
      f"decode.method={d.method!r} decodes with System 2: set exactly one of "
      f"collab.path, collab.preset, collab.workdir (set: {sources(co) or 'none'})"
    )
  if co.rollback > 0 and d.method != "speculative":
    raise ValueError(
      f"collab.rollback={co.rollback} (BiLD) is a rule of greedy speculative "
      f"decoding: decode.method='speculative', decode.temperature=0 (got "
      f"{d.method!r}, {d.temperature})"
    )
  if d.method == "proxy" and len(sources(co.base)) != 1:
    raise ValueError(
      "decode.method='proxy' needs the small model before tuning: set exactly "
      "one of collab.base.path, collab.base.preset, collab.base.workdir"
    )
  if d.method == "routed":
    if co.router not in ROUTERS:
      raise ValueError(f"collab.router {co.router!r}: use one of {', '.join(ROUTERS)}")
    check_router_margin(co)
    if (co.router == "svm") != bool(co.router_svm):
      raise ValueError(
        f"collab.router={co.router!r} with collab.router_svm="
        f"{co.router_svm!r}: the svm router reads its file, no other does"
      )
  check_spec(spec_from_config(config))
