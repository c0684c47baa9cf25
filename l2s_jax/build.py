"""Models and their initial params from a config's `llm` / `slm` / `projector` groups.

The modules come from a preset (+ overrides) or a transformers directory's
config; params are initialised at random or loaded from that directory. The
assembly layer (`l2s_jax.assemble`) decides which params a run needs and where
they are placed; this module only knows how to make each part.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2s_jax import config_schema, hf
from l2s_jax.models import GPT2, Llama, LLMToSLM, T5, adapter_for, gpt2, init_boxed, llama, t5
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


def with_compute_dtype(model: nn.Module, dtype: str) -> nn.Module:
  """The same model computing in `dtype` (params keep their storage dtype)."""
  if adapter_for(model).is_hybrid:
    return model.clone(slm=with_compute_dtype(model.slm, dtype), dtype=_DTYPES[dtype])
  return model.clone(config=dataclasses.replace(model.config, dtype=_DTYPES[dtype]))


def with_remat(model: nn.Module) -> nn.Module:
  """The same model recomputing each layer's activations in the backward pass
  (each block under `jax.checkpoint`; decoder-only models scan their stacked layers,
  `DecoderOnlyLM._scanned_blocks`): a train step keeps one residual stream per layer instead of
  everything the layers made, for about one more forward pass of FLOPs. A hybrid's frozen
  LLM takes no gradient and saves nothing: only its small model is rematerialized."""
  if adapter_for(model).is_hybrid:
    return model.clone(slm=with_remat(model.slm))
  return model.clone(config=dataclasses.replace(model.config, remat=True))


def group_module(
  group: ml_collections.ConfigDict,
  name: str,
  *,
  vocab_size: int | None = None,
  encoder_only: bool = False,
  reads_vocab: int | None = None,
) -> nn.Module:
  """The module a model group describes: `group.path`'s config, or `group.preset` + overrides.

  vocab_size: the tokenizer's size; a preset's vocabulary is set to it, a
  checkpoint's must be at least as large. reads_vocab: the size of a tokenizer
  the model only reads (the LLM's own); its vocabulary must hold it, unchanged.
  """
  model = _group_module(group, name, vocab_size=vocab_size, encoder_only=encoder_only)
  # A checkpoint keeps its vocabulary: it must hold every id its tokenizer(s) give.
  need = max(
    [v for v in (vocab_size if group.path else None, reads_vocab) if v is not None], default=None
  )
  if need is not None and model.config.vocab_size < need:
    source = f"path {group.path!r}" if group.path else f"preset {group.preset!r}"
    raise ValueError(
      f"{name}.{source} has a vocabulary of {model.config.vocab_size}, but "
      f"the tokenizer has {need} ids"
    )
  return model


def _group_module(group, name, *, vocab_size, encoder_only) -> nn.Module:
  if group.path:
    model = hf.load_module(
      group.path, dtype=group.dtype, encoder_only=encoder_only if encoder_only else None
    )
    if encoder_only and not getattr(model, "encoder_only", False):
      raise ValueError(f"{name}.path {group.path!r} is not a T5 checkpoint")
    return model
  cls, cfg = preset(group.preset)
  changes = config_schema.structured("overrides", group.overrides, f"{name}.overrides")
  if vocab_size is not None:
    changes.setdefault("vocab_size", vocab_size)
  dtype = _DTYPES[group.dtype]
  try:
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype, **changes)
  except TypeError as e:
    raise ValueError(f"{name}.overrides {changes}: {e}") from e
  if encoder_only and cls is not T5:
    raise ValueError(f"{name}.preset {group.preset!r}: the LLM must be a T5-family encoder")
  return T5(cfg, encoder_only=True) if encoder_only else cls(cfg)


def group_params(
  group: ml_collections.ConfigDict, module: nn.Module, *, rng: jax.Array, shardings=None
):
  """Params of a model group: loaded from `group.path` (host arrays, for the caller to
  place), or initialised from `rng`, directly into `shardings` when given."""
  if group.path:
    _, params = hf.load(
      group.path,
      dtype=group.dtype,
      on_device=False,
      encoder_only=True if getattr(module, "encoder_only", False) else None,
    )
    return params
  dtype = storage_dtype(group)
  return jax.jit(
    lambda r: jax.tree.map(lambda x: x.astype(dtype), nn.unbox(init_boxed(module, r))),
    out_shardings=shardings,
  )(rng)


def storage_dtype(group: ml_collections.ConfigDict):
  """The dtype a model group's params are kept in (`group.dtype`), loaded or initialised."""
  if group.dtype not in _DTYPES:
    raise ValueError(f"dtype {group.dtype!r}: float32 or bfloat16")
  return _DTYPES[group.dtype]


def build_model(
  config: ml_collections.ConfigDict,
  vocab_size: int | None = None,
  llm_vocab_size: int | None = None,
) -> nn.Module:
  """The module of `config.model.kind`: the hybrid (frozen LLM encoder + projector + SLM),
  or one plain model (the `slm` group)."""
  slm = group_module(config.slm, "slm", vocab_size=vocab_size)
  if config.model.kind == "plain":
    return slm
  llm = group_module(config.llm, "llm", encoder_only=True, reads_vocab=llm_vocab_size)
  return LLMToSLM(
    llm=llm,
    slm=slm,
    projector_hidden=config.projector.hidden or None,
    mode=config.model.mode,
    zero_init_projector=config.projector.zero_init_out,
  )


def param_rngs(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """The init keys of the llm / slm / projector subtrees, from `config.seed`."""
  llm_rng, slm_rng, proj_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  return {"llm": llm_rng, "slm": slm_rng, "projector": proj_rng}


def initial_params(config: ml_collections.ConfigDict, model: nn.Module, shardings=None):
  """(frozen, trainable) params as configured, before any training.

  hybrid: frozen = the LLM encoder's, trainable = {projector, slm}; plain:
  frozen = {}, trainable = the model's. `shardings`: (trainable, frozen)
  shardings to initialise into (loaded params come back as host arrays).
  """
  rngs = param_rngs(config)
  t_sh, f_sh = shardings if shardings is not None else (None, None)
  if not adapter_for(model).is_hybrid:
    return {}, dict(group_params(config.slm, model, rng=rngs["slm"], shardings=t_sh))
  frozen = group_params(config.llm, model.llm, rng=rngs["llm"], shardings=f_sh)
  slm = group_params(
    config.slm, model.slm, rng=rngs["slm"], shardings=None if t_sh is None else t_sh["slm"]
  )
  projector = init_projector(
    model, rngs["projector"], shardings=None if t_sh is None else t_sh["projector"]
  )
  return dict(frozen), {"projector": projector, "slm": dict(slm)}


def init_projector(model: LLMToSLM, rng: jax.Array, shardings=None):
  """Initialises the projector alone (the LLM and SLM params come from elsewhere)."""
  slm_dim = model_width(model.slm)
  p = Projector(
    model_width(model.llm), slm_dim, model.projector_hidden or slm_dim, model.zero_init_projector
  )
  x = jnp.zeros((1, 1, model_width(model.llm)))
  return jax.jit(lambda r: nn.unbox(p.init(r, x)["params"]), out_shardings=shardings)(rng)


def resized_overrides(group: ml_collections.ConfigDict, width: int, name: str = "slm") -> dict:
  """`group.overrides` (a dict) with the preset's model width set to `width`: the feed-forward
  width scaled with it, the head count kept (T5's d_kv and Llama's head_dim follow, T5's at
  least 4). The family's other fields are unchanged, so widths are the only variable."""
  if group.path or not group.preset:
    raise ValueError(
      f"{name}: a study trains SLMs of other widths from a preset "
      f"({name}.preset), not from a checkpoint ({name}.path {group.path!r})"
    )
  cls, cfg = preset(group.preset)
  changes = config_schema.structured("overrides", group.overrides, f"{name}.overrides")
  try:
    base = dataclasses.replace(cfg, **changes)
  except TypeError as e:
    raise ValueError(f"{name}.overrides {changes}: {e}") from e
  if cls is T5:
    heads, old = base.num_heads, base.d_model
    new = {
      "d_model": width,
      "d_kv": max(width // heads, 4),
      "d_ff": max(1, round(base.d_ff * width / old)),
    }
  elif cls is GPT2:
    heads, old = base.n_head, base.n_embd
    new = {"n_embd": width, "n_inner": max(1, round(base.inner * width / old))}
  else:
    heads, old = base.num_attention_heads, base.hidden_size
    new = {
      "hidden_size": width,
      "intermediate_size": max(1, round(base.intermediate_size * width / old)),
    }
    if base.head_dim is not None:
      new["head_dim"] = max(width // heads, 4)
  if cls is not T5 and width % heads:
    raise ValueError(
      f"study width {width}: {name}.preset {group.preset!r} has {heads} heads, "
      "which must divide the width"
    )
  changes.update(new)
  return changes
