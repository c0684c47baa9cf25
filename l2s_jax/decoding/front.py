"""The one decoding front: `decode(spec, models, params, prompts)` for every method.

    spec = Sample(Greedy())                  # or Beam, Speculative, Combined, Routed
    out = decode(spec, model, params, ids, mask, max_new_tokens=32, eos_id=1)
    out.tokens, out.lengths, out.stats, out.summary()

It does, once for every method: the spec's own checks, the shared vocabulary of several
models (`decoding.vocab`), the request (prompts validated, bucketed, fitted to every model's
positions, stop ids checked, the batch split over the mesh's data axes:
`decoding.request`), the default key, one jit with the spec static, and the host arrays
cut back to the caller's rows. `lower` stops before running: the same program, lowered,
for inspection or ahead-of-time compilation.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax import sharding
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS
from l2s_jax.decoding.request import Request, abstract_request, model_vocab_size, prepare_request
from l2s_jax.decoding.spec import Decoded, DecodeSpec, Inputs, prefill
from l2s_jax.decoding.vocab import common_vocab

Array = jax.Array


def decode_core(params, inputs, rng, knobs, *, spec, models, max_new_tokens, vocab):
  """Traceable: the spec's loop over prepared prompts (`spec.Inputs`)."""
  return spec.run(models, params, inputs, rng, knobs, max_new_tokens=max_new_tokens, vocab=vocab)


_STATIC = ("spec", "models", "max_new_tokens", "vocab")
_decode_jit = jax.jit(decode_core, static_argnames=_STATIC)


def prefill_core(params, inputs, rng, knobs, *, spec, models, max_new_tokens, vocab):
  """Traceable: the prefill every method starts with (each model reads the prompts once),
  alone: the decoder's program without its loop."""
  del rng, knobs, spec, max_new_tokens, vocab
  return prefill(models, params, inputs)


_prefill_jit = jax.jit(prefill_core, static_argnames=_STATIC)


def _prepare(
  spec: DecodeSpec,
  models,
  params,
  input_ids,
  attention_mask,
  *,
  max_new_tokens,
  eos_id,
  stop_ids,
  pad_id,
  rng,
  tokenizer_size,
  prompt_buckets,
  extra_inputs,
  mesh,
):
  models = tuple(models) if isinstance(models, (list, tuple)) else (models,)
  params = tuple(params) if isinstance(params, (list, tuple)) else (params,)
  if not isinstance(spec, DecodeSpec):
    raise ValueError(f"spec must be a decoding method's spec (l2s_jax.decoding), got {spec!r}")
  if len(models) != len(params):
    raise ValueError(f"{len(models)} models but {len(params)} param trees")
  if len(models) != spec.num_models:
    raise ValueError(
      f"{type(spec).__name__} decodes with {spec.num_models} models "
      f"({', '.join(spec.model_names)}), got {len(models)}"
    )
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if not (
    isinstance(pad_id, (int, np.integer))
    and not isinstance(pad_id, bool)
    and np.iinfo(np.int32).min <= pad_id <= np.iinfo(np.int32).max
  ):
    raise ValueError(f"pad_id must be an int32 integer, got {pad_id!r}")
  spec.validate(int(max_new_tokens))
  if len(models) == 1:
    vocab = model_vocab_size(models[0])
  else:
    vocab = common_vocab(models, tokenizer_size, names=spec.model_names)
  if extra_inputs is None or isinstance(extra_inputs, dict):
    extra_inputs = [extra_inputs] + [None] * (len(models) - 1)
  budget = int(max_new_tokens) + spec.cache_slack
  if isinstance(input_ids, jax.ShapeDtypeStruct):  # shapes alone: lowering ahead of time
    req = abstract_request(
      models,
      input_ids,
      budget=budget,
      vocab=vocab,
      eos_id=eos_id,
      stop_ids=stop_ids,
      extra_inputs=extra_inputs,
      mesh=mesh,
    )
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=_replicated(mesh))
    host = np.asarray  # constants of the program, placed by the compiler
  else:
    req = prepare_request(
      models,
      input_ids,
      attention_mask,
      budget=budget,
      vocab=vocab,
      eos_id=eos_id,
      stop_ids=stop_ids,
      pad_id=pad_id,
      prompt_buckets=prompt_buckets,
      extra_inputs=extra_inputs,
      mesh=mesh,
    )
    key = jax.random.PRNGKey(0)
    host = jnp.asarray
  inputs = Inputs(
    req.input_ids,
    req.attention_mask,
    req.extra,
    host(np.asarray(req.stop_ids, np.int32).reshape(-1)),
    host(np.int32(pad_id)),
    req.cache_lens,
  )
  args = (params, inputs, key if rng is None else rng, spec.knobs(int(max_new_tokens)))
  static = dict(spec=spec, models=models, max_new_tokens=int(max_new_tokens), vocab=vocab)
  return req, args, static


def decode(
  spec: DecodeSpec,
  models,
  params,
  input_ids,
  attention_mask=None,
  *,
  max_new_tokens: int,
  eos_id: int | Sequence[int] | None,
  stop_ids: Sequence[int] = (),
  pad_id: int = 0,
  rng: Array | None = None,
  tokenizer_size: int | None = None,
  prompt_buckets: Sequence[int] | None = DEFAULT_BUCKETS,
  extra_inputs: dict | Sequence[dict | None] | None = None,
  mesh=None,
) -> Decoded:
  """Decodes prompts with the method `spec` describes.

  Args:
    spec: the method and its static settings (Sample, Beam, Speculative, Combined, Routed).
    models, params: one model and its params, or a sequence in the spec's order
      (large, small, ...) for the collaborative methods; every model reads the same prompts.
    input_ids, attention_mask: [B, P] prompts, left- or right-padded (host arrays).
    max_new_tokens: N, the most tokens generated per row (the stop token included).
    eos_id, stop_ids: ids that end a row (emitted, then pad_id).
    rng: PRNG key of the samplers (default: key 0).
    tokenizer_size: for models whose output layers differ by padding rows.
    prompt_buckets: prompt lengths are padded up to one of these, so a method compiles
      once per bucket; None: no bucketing.
    extra_inputs: more prefill inputs ([B, ...] arrays): a dict for one model, or one dict
      (or None) per model, e.g. a hybrid's LLM prompt.
    mesh: split the batch over the mesh's data axes (padded to a multiple of their size);
      params are used as placed.
  Returns:
    Decoded: tokens [B, N], lengths [B], the method's statistics.
  """
  req, args, static = _prepare(
    spec,
    models,
    params,
    input_ids,
    attention_mask,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    stop_ids=stop_ids,
    pad_id=pad_id,
    rng=rng,
    tokenizer_size=tokenizer_size,
    prompt_buckets=prompt_buckets,
    extra_inputs=extra_inputs,
    mesh=mesh,
  )
  with _traced_under(mesh):
    out = _decode_jit(*args, **static)
  return _finish(spec, req, out)


def lower(
  spec: DecodeSpec,
  models,
  params,
  input_ids,
  attention_mask=None,
  *,
  prefill_only: bool = False,
  **kwargs,
):
  """The program `decode` would run, lowered (`.compile()`, `.as_text()`); nothing runs.

  Takes `decode`'s arguments. Ahead of time, from shapes alone: params as ShapeDtypeStructs
  (with their shardings), `input_ids` a ShapeDtypeStruct [B, P] of bucketed prompts, and
  `extra_inputs` ShapeDtypeStructs too; `mesh` may span devices this process cannot run
  on (a TPU topology described by libtpu, `jax.experimental.topologies`). `prefill_only`:
  the same request's prefill alone (every method's first part), to tell its cost apart
  from the loop's."""
  kwargs = {
    "stop_ids": (),
    "pad_id": 0,
    "rng": None,
    "tokenizer_size": None,
    "prompt_buckets": DEFAULT_BUCKETS,
    "extra_inputs": None,
    "mesh": None,
    **kwargs,
  }
  _, args, static = _prepare(spec, models, params, input_ids, attention_mask, **kwargs)
  with _traced_under(kwargs["mesh"]):
    return (_prefill_jit if prefill_only else _decode_jit).lower(*args, **static)


def _traced_under(mesh):
  """The mesh set while the program is traced (`jax.set_mesh`): the layers read from it
  whether heads are split (the KV cache write, `models.layers.update_layer_cache`); part of
  jit's cache key, so another mesh traces anew."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _replicated(mesh):
  return sharding.replicated(mesh) if mesh is not None else None


def compiled_programs() -> int:
  """How many programs the front has compiled (one per spec, models and shapes)."""
  return _decode_jit._cache_size()


def _finish(spec: DecodeSpec, req: Request, out: dict) -> Decoded:
  host = {k: None if v is None else sharding.to_host(v) for k, v in out.items()}
  return spec.finish(
    {
      k: v if k in spec.per_call_outputs else v[: req.rows]
      for k, v in host.items()
      if v is not None
    },
    req.rows,
  )
