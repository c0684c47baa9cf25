"""Models and their initial params from a config's `llm` / `slm` / `projector` groups."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2s_jax import config_schema, hf
from l2s_jax.models import GPT2, LLMToSLM, Llama, T5, gpt2, init_params, llama, t5
from l2s_jax.models.hybrid import Projector, model_width

_FAMILIES = ((t5.PRESETS, T5), (gpt2.PRESETS, GPT2), (llama.PRESETS, Llama))
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def preset(name: str):
  """(module class, config dataclass) of a named preset."""
  for presets, cls in _FAMILIES:
    if name in presets:
      return cls, presets[name]
  known = sorted(k for presets, _ in _FAMILIES for k in presets)
  raise ValueError(f"unknown model preset {name!r}; known: {known}")


def _overrides(group: ml_collections.ConfigDict, name: str) -> dict:
  return config_schema.json_object(group.overrides, f"{name}.overrides")


def with_compute_dtype(model: nn.Module, dtype: str) -> nn.Module:
  """The same model computing in `dtype` (params keep their storage dtype)."""
  if isinstance(model, LLMToSLM):
    return model.clone(slm=with_compute_dtype(model.slm, dtype), dtype=_DTYPES[dtype])
  return model.clone(config=dataclasses.replace(model.config, dtype=_DTYPES[dtype]))


def load_model(group: ml_collections.ConfigDict, name: str, *, rng: jax.Array,
               vocab_size: int | None = None, encoder_only: bool = False):
  """(model, params) from `group.path` (transformers) or `group.preset` (random).

  vocab_size: the tokenizer's size; a preset's vocabulary is set to it, a
  checkpoint's must be at least as large.
  """
  if group.path:
    model, params = hf.load(group.path, dtype=group.dtype,   # placed by the caller's shardings
                            encoder_only=encoder_only if encoder_only else None, on_device=False)
    if encoder_only and not getattr(model, "encoder_only", False):
      raise ValueError(f"{name}.path {group.path!r} is not a T5 checkpoint")
    if vocab_size is not None and model.config.vocab_size < vocab_size:
      raise ValueError(f"{name}.path {group.path!r} has a vocabulary of "
                       f"{model.config.vocab_size}, but the tokenizer has {vocab_size} ids")
    return model, params
  cls, cfg = preset(group.preset)
  changes = _overrides(group, name)
  if vocab_size is not None:
    changes.setdefault("vocab_size", vocab_size)
  dtype = _DTYPES[group.dtype]
  try:
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, **changes)
  except TypeError as e:
    raise ValueError(f"{name}.overrides {changes}: {e}") from e
  if encoder_only and cls is not T5:
    raise ValueError(f"{name}.preset {group.preset!r}: the LLM must be a T5-family encoder")
  model = T5(cfg, encoder_only=True) if encoder_only else cls(cfg)
  return model, init_params(model, rng)


def build(config: ml_collections.ConfigDict, vocab_size: int | None = None):
  """(model, frozen_params, trainable_params) for `config.model.kind`.

  hybrid: frozen = the LLM encoder's params, trainable = {projector, slm}.
  plain: frozen = {}, trainable = the SLM group's model, all of it.
  """
  rng = jax.random.PRNGKey(config.seed)
  llm_rng, slm_rng, proj_rng = jax.random.split(rng, 3)
  slm, slm_params = load_model(config.slm, "slm", rng=slm_rng, vocab_size=vocab_size)
  if config.model.kind == "plain":
    return slm, {}, dict(slm_params)
  llm, llm_params = load_model(config.llm, "llm", rng=llm_rng, vocab_size=None,
                               encoder_only=True)
  model = LLMToSLM(llm=llm, slm=slm, projector_hidden=config.projector.hidden or None,
                   mode=config.model.mode, zero_init_projector=config.projector.zero_init_out)
  projector = _init_projector(model, proj_rng)
  return model, dict(llm_params), {"projector": projector, "slm": dict(slm_params)}


def _init_projector(model: LLMToSLM, rng: jax.Array):
  """Initialises the projector alone (the LLM and SLM params come from elsewhere)."""
  slm_dim = model_width(model.slm)
  p = Projector(model_width(model.llm), slm_dim, model.projector_hidden or slm_dim,
                model.zero_init_projector)
  x = jnp.zeros((1, 1, model_width(model.llm)))
  return jax.jit(lambda r: nn.unbox(p.init(r, x)["params"]))(rng)
