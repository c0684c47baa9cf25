"""Model families: T5 (encoder-decoder), GPT-2 and Llama/Qwen2 (decoder-only)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2s_jax.models.adapters import ModelAdapter, adapter_for
from l2s_jax.models.gpt2 import GPT2, GPT2Config
from l2s_jax.models.hybrid import LLMToSLM, Projector
from l2s_jax.models.llama import Llama, LlamaConfig
from l2s_jax.models.t5 import T5, T5Config

__all__ = [
  "T5",
  "T5Config",
  "GPT2",
  "GPT2Config",
  "Llama",
  "LlamaConfig",
  "LLMToSLM",
  "Projector",
  "init_params",
  "init_boxed",
  "is_encoder_decoder",
  "count_params",
  "ModelAdapter",
  "adapter_for",
]


def is_encoder_decoder(model: nn.Module) -> bool:
  """A T5, or a hybrid whose SLM is one."""
  return adapter_for(model).kind == "encoder_decoder"


def _dummy_inputs(model: nn.Module):
  ids = jnp.zeros((1, 2), jnp.int32)
  if isinstance(model, LLMToSLM):
    kw = dict(
      input_ids=ids,
      attention_mask=jnp.ones_like(ids),
      llm_input_ids=ids,
      llm_attention_mask=jnp.ones_like(ids),
      prompt_mask=jnp.ones_like(ids),
    )
    if model.is_encoder_decoder:
      kw["decoder_input_ids"] = ids
    return kw, None
  if isinstance(model, T5):
    if model.encoder_only:
      return dict(input_ids=ids, attention_mask=jnp.ones_like(ids)), model.encode
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), decoder_input_ids=ids), None
  return dict(input_ids=ids, attention_mask=jnp.ones_like(ids)), None


def init_boxed(model: nn.Module, rng: jax.Array):
  """Params with their logical-axis metadata (nn.LogicallyPartitioned boxes).

  Traceable: wrap in `jax.jit` / `jax.eval_shape` (unjitted, every op would
  be compiled on its own, which is slow).
  """
  kwargs, method = _dummy_inputs(model)
  return model.init(rng, method=method, **kwargs)["params"]


def init_params(model: nn.Module, rng: jax.Array):
  """Randomly initialised params (plain arrays), computed under `jax.jit`."""
  return jax.jit(lambda r: nn.unbox(init_boxed(model, r)))(rng)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
