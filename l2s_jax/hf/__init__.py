"""transformers checkpoint directories <-> (model, params), without torch.

model, params = l2s_jax.hf.load("/path/to/t5-small")          # float32
logits = model.apply({"params": params}, input_ids, attention_mask,
                     decoder_input_ids=decoder_input_ids)
l2s_jax.hf.save(model, params, "/path/to/out")                 # transformers loads it
l2s_jax.hf.save(model, params, "/path/to/out", max_shard_size="5GB")   # sharded + index
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.hf import convert, gpt2, io, llama, t5
from l2s_jax.hf.io import CheckpointError
from l2s_jax.models import init_params
from l2s_jax.models.gpt2 import GPT2
from l2s_jax.models.llama import Llama
from l2s_jax.models.t5 import T5

__all__ = ["load", "load_module", "save", "load_config", "CheckpointError"]

_FAMILIES: tuple[types.ModuleType, ...] = (t5, gpt2, llama)
_BY_TYPE = {mt: fam for fam in _FAMILIES for mt in fam.MODEL_TYPES}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _family(model_type: Any) -> types.ModuleType:
  if model_type not in _BY_TYPE:
    raise CheckpointError(f"unsupported model_type {model_type!r}; supported: {sorted(_BY_TYPE)}")
  return _BY_TYPE[model_type]


def _dtype(dtype):
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type if dtype is not None else jnp.float32


def load_config(path: str, dtype="float32", tensors: dict | None = None):
  """The model config of a checkpoint directory (reads tensors only if needed)."""
  hf = io.read_config(path)
  fam = _family(hf.get("model_type"))
  if tensors is None:
    tensors = fam.prepare_tensors(io.read_tensors(path))
  return fam.config_from_hf(hf, tensors, _dtype(dtype))


def load_module(path: str, dtype="float32", *, encoder_only: bool | None = None):
  """The Flax module of a checkpoint directory, without its params (they come from elsewhere,
  e.g. a training checkpoint). Only the tensors the config depends on are read (T5:
  the embedding and head, to tell whether they are tied)."""
  dtype = _dtype(dtype)
  hf = io.read_config(path)
  fam = _family(hf.get("model_type"))
  tensors = fam.prepare_tensors(io.read_tensors(path, only=fam.CONFIG_TENSORS))
  config = fam.config_from_hf(hf, tensors, dtype)
  enc_only = fam.is_encoder_only(hf, tensors) if encoder_only is None else encoder_only
  if enc_only and fam is not t5:
    raise CheckpointError(f"encoder_only=True needs an encoder-decoder, not {hf['model_type']!r}")
  return fam.build(config, enc_only)


def load(path: str, dtype="float32", *, encoder_only: bool | None = None, on_device: bool = True):
  """Reads a transformers `save_pretrained` directory.

  Args:
    path: directory with config.json and model.safetensors (or a sharded
      index). T5 / mT5, GPT-2, Llama and Qwen2 are supported.
    dtype: "float32" | "bfloat16" | "float16" (params and compute).
    encoder_only: for T5, build only the encoder (the frozen LLM of the
      hybrid); default: whatever the checkpoint holds.
    on_device: put the params on the default device (jax arrays), so that
      jitted calls do not copy them from the host on every call; False
      keeps NumPy arrays, for callers that place them with a sharding.
  Returns:
    (model, params): a Flax module and its param tree.
  """
  dtype = _dtype(dtype)
  hf = io.read_config(path)
  fam = _family(hf.get("model_type"))
  tensors = fam.prepare_tensors(io.read_tensors(path))
  config = fam.config_from_hf(hf, tensors, dtype)
  enc_only = fam.is_encoder_only(hf, tensors) if encoder_only is None else encoder_only
  if enc_only and fam is not t5:
    raise CheckpointError(f"encoder_only=True needs an encoder-decoder, not {hf['model_type']!r}")
  rules = fam.rules(config, enc_only)
  ignore = fam.ignore(config)
  if enc_only:  # the decoder of an encoder-decoder checkpoint is left out on purpose
    ignore = ignore + (r"decoder\..*", r"lm_head\.weight")
  params = convert.tensors_to_params(tensors, rules, dtype=dtype, ignore=ignore, source=path)
  model = fam.build(config, enc_only)
  _check_tree(model, params)
  if on_device:
    params = jax.device_put(params)
  return model, params


def _check_tree(model, params) -> None:
  """The converted tree must be exactly the one the module declares."""
  expected = jax.eval_shape(lambda: _abstract_params(model))
  got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if jax.tree.structure(expected) != jax.tree.structure(got):
    raise AssertionError(
      f"param tree mismatch for {type(model).__name__}: "
      f"{jax.tree.structure(expected)} vs {jax.tree.structure(got)}"
    )
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    if e.shape != g.shape:
      raise AssertionError(f"param shape mismatch {e.shape} vs {g.shape}")


def _abstract_params(model):
  return init_params(model, jax.random.PRNGKey(0))


def _family_of_model(model) -> types.ModuleType:
  if isinstance(model, T5):
    return t5
  if isinstance(model, GPT2):
    return gpt2
  if isinstance(model, Llama):
    return llama
  raise TypeError(f"cannot save a {type(model).__name__} as a transformers checkpoint")


def to_tensors(model, params) -> dict[str, np.ndarray]:
  """`params` (or any tree of their shapes: gradients, say) as transformers' tensors, by
  the names and layouts `save` writes."""
  fam = _family_of_model(model)
  encoder_only = bool(getattr(model, "encoder_only", False))
  params = jax.tree.map(np.asarray, jax.device_get(params))
  tensors = convert.params_to_tensors(params, fam.rules(model.config, encoder_only))
  if fam is gpt2:
    tensors = {fam.hf_prefix() + k: v for k, v in tensors.items()}
  return tensors


def save(
  model, params, path: str, *, dtype: str | None = None, max_shard_size: int | str = "50GB"
) -> None:
  """Writes `path` as a transformers checkpoint directory (config + safetensors).

  Tensors keep the params' dtype unless `dtype` ("float32", "bfloat16")
  is given. Weights larger than `max_shard_size` (bytes, or "5GB", "500MB",
  "2GiB" as transformers takes it; transformers' default) are split into
  `model-00001-of-0000N.safetensors` shards listed in
  `model.safetensors.index.json`, as `save_pretrained` writes them. Existing
  files other than the config and weights (a tokenizer, say) are kept; no file
  is replaced until every new one is written, so a failed save leaves the
  previous checkpoint intact.
  """
  io.parse_size(max_shard_size)  # a bad size fails before any work
  fam = _family_of_model(model)
  encoder_only = bool(getattr(model, "encoder_only", False))
  config = model.config
  if fam is llama:
    llama._check_representable(config)
  hf = fam.config_to_hf(config, encoder_only)
  tensors = to_tensors(model, params)
  if dtype is not None:
    np_dtype = np.dtype(_dtype(dtype))
    tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  hf["dtype"] = str(next(iter(tensors.values())).dtype)
  io.write_checkpoint(path, hf, tensors, max_shard_size=max_shard_size)
