"""What the rest of the library asks of a model, answered once per model kind.

  adapter = adapter_for(model)
  adapter.kind                     "encoder_decoder" (T5) or "decoder_only" (GPT-2,
                                   Llama/Qwen2): how the model reads a prompt
  adapter.is_hybrid                an LLM-to-SLM hybrid (its kind is its SLM's)
  adapter.trained                  the module whose params train (a hybrid's SLM)
  trainable, frozen = adapter.split(params);  params = adapter.merge(trainable, frozen)
  ids, mask = adapter.prompt(batch)                  the prompts of a pipeline batch
  adapter.prompt_extras(batch, prompt_width)         System 1's extra prefill inputs
  adapter.partner_inputs(ids, mask)                  a partner's, reading our prompt ids
  adapter.loss_inputs(batch)                         model.apply's inputs, targets, weights

Batches are the data pipeline's (`l2s_jax.data.batching`). Encoder-decoder:
inputs / inputs_mask [B, P], targets / targets_mask [B, T]. Decoder-only:
tokens / tokens_mask / loss_mask [B, T] (prompt, then response) and
prompt_lengths [B]. A hybrid's batch adds llm_inputs / llm_inputs_mask [B, M]
(the prompt in the LLM's tokenizer) and, with two tokenizers, overlap [B, P, M].
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax.models.hybrid import LLMToSLM
from l2s_jax.models.t5 import T5

ENCODER_DECODER, DECODER_ONLY = "encoder_decoder", "decoder_only"
FROZEN = "llm"  # a hybrid's frozen subtree: the LLM encoder's params

Array = jax.Array


def shift_right(targets_BT: Array, start_id: int) -> Array:
  """Decoder inputs of a T5: the start token, then the targets but the last."""
  start = jnp.full_like(targets_BT[:, :1], start_id)
  return jnp.concatenate([start, targets_BT[:, :-1]], axis=1)


def batch_prompts(batch: dict, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) [B, P] of a host batch's prompts alone, right-padded.

  encoder_decoder: the inputs as they are. decoder_only: the first
  prompt_lengths tokens of each row, P = the longest prompt (at least 1).
  """
  if kind == ENCODER_DECODER:
    return batch["inputs"], batch["inputs_mask"]
  lengths = batch["prompt_lengths"]
  width = max(int(lengths.max()), 1)
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  return batch["tokens"][:, :width] * mask, mask


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What the loss of one batch reads.

  inputs: keyword arguments of `model.apply(variables, **inputs)`, whose logits are
  [B, T, V], or [B, T + 1, V] when `next_token`. targets, weights [B, T]: the token
  each scored position predicts, and 1 where the loss counts it. next_token: a
  decoder-only model, whose position t predicts token t + 1 (its last logits score
  nothing).
  """

  inputs: dict[str, Any]
  targets: Array
  weights: Array
  next_token: bool = False

  def scored(self, logits: Array) -> Array:
    """The logits [B, T, V] aligned with `targets`."""
    return logits[:, :-1] if self.next_token else logits


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
  """A plain model: all its params train, nothing but the prompt is read."""

  model: nn.Module
  kind: ClassVar[str] = ""
  is_hybrid: ClassVar[bool] = False

  @property
  def trained(self) -> nn.Module:
    """The module whose params the trainable tree holds."""
    return self.model

  def split(self, tree) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a full param tree (or of any tree shaped like it)."""
    return tree, {}

  def merge(self, trainable, frozen) -> Any:
    """The full tree `model.apply` takes; the inverse of `split`."""
    del frozen
    return trainable

  def prompt(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [B, P] of a host batch's prompts (`batch_prompts`)."""
    return batch_prompts(batch, self.kind)

  def prompt_extras(self, batch: dict, prompt_width: int) -> dict:
    """The prefill inputs besides (ids, mask) that this model needs from a batch, as
    System 1: none."""
    return {}

  def partner_inputs(self, ids, mask) -> dict:
    """The prefill inputs besides (ids, mask) this model needs when it decodes beside
    another one and reads the same prompt ids [B, P]: none."""
    return {}

  def loss_inputs(self, batch: dict) -> LossInputs:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class EncoderDecoder(ModelAdapter):
  """T5: the prompt is the encoder's input, the target the decoder's, shifted right."""

  kind: ClassVar[str] = ENCODER_DECODER

  def loss_inputs(self, batch: dict) -> LossInputs:
    targets = batch["targets"]
    dec_in = shift_right(targets, self.model.config.decoder_start_token_id)
    return LossInputs(
      {
        "input_ids": batch["inputs"],
        "attention_mask": batch["inputs_mask"],
        "decoder_input_ids": dec_in,
      },
      targets,
      batch["targets_mask"],
    )


@dataclasses.dataclass(frozen=True)
class DecoderOnly(ModelAdapter):
  """GPT-2, Llama/Qwen2 (any causal LM): prompt and response are one sequence, and the
  loss covers the response (`loss_mask`)."""

  kind: ClassVar[str] = DECODER_ONLY

  def loss_inputs(self, batch: dict) -> LossInputs:
    tokens = batch["tokens"]
    return LossInputs(
      {"input_ids": tokens, "attention_mask": batch["tokens_mask"]},
      tokens[:, 1:],
      batch["loss_mask"][:, 1:],
      next_token=True,
    )


@dataclasses.dataclass(frozen=True)
class Hybrid(ModelAdapter):
  """LLM-to-SLM: a frozen LLM encoder (params under "llm") reads the prompt as well;
  the projector and the SLM (`slm`, the SLM's own adapter) train."""

  slm: ModelAdapter = None
  is_hybrid: ClassVar[bool] = True

  @property
  def kind(self) -> str:
    return self.slm.kind

  @property
  def trained(self) -> nn.Module:
    return self.model.slm

  def split(self, tree) -> tuple[Any, Any]:
    return {k: v for k, v in tree.items() if k != FROZEN}, tree[FROZEN]

  def merge(self, trainable, frozen) -> Any:
    return {**trainable, FROZEN: frozen}

  def prompt_extras(self, batch: dict, prompt_width: int) -> dict:
    """The LLM side of the prompt: llm_input_ids / llm_attention_mask [B, M], and with two
    tokenizers overlap [B, prompt_width, M] (its rows cut to the prompt width)."""
    extra = {"llm_input_ids": batch["llm_inputs"], "llm_attention_mask": batch["llm_inputs_mask"]}
    if "overlap" in batch:
      extra["overlap"] = batch["overlap"][:, :prompt_width]
    return extra

  def partner_inputs(self, ids, mask) -> dict:
    """Our prompt ids [B, P] through the LLM encoder too (the models share one tokenizer)."""
    return {"llm_input_ids": ids, "llm_attention_mask": mask}

  def loss_inputs(self, batch: dict) -> LossInputs:
    """The SLM's, plus the LLM side: llm_inputs (default: the SLM's prompt ids, one
    tokenizer), overlap if the batch has it, and for a decoder-only SLM prompt_mask [B, T]
    (1 on prompt tokens: the LLM's states land there alone)."""
    base = self.slm.loss_inputs(batch)
    extra = {}
    if self.kind == ENCODER_DECODER:
      prompt_ids, prompt_mask = batch["inputs"], batch["inputs_mask"]
    else:
      tokens = batch["tokens"]
      positions = jnp.arange(tokens.shape[1])[None, :]
      prompt_mask = (positions < batch["prompt_lengths"][:, None]).astype(jnp.int32)
      prompt_ids = tokens * prompt_mask
      extra["prompt_mask"] = prompt_mask
    extra["llm_input_ids"] = batch.get("llm_inputs", prompt_ids)
    extra["llm_attention_mask"] = batch.get("llm_inputs_mask", prompt_mask)
    if "overlap" in batch:
      extra["overlap"] = batch["overlap"]
    return dataclasses.replace(base, inputs={**base.inputs, **extra})


def adapter_for(model: nn.Module) -> ModelAdapter:
  """The adapter of `model`'s kind: a hybrid's wraps its SLM's; T5 is encoder-decoder;
  every other model (GPT-2, Llama/Qwen2) decoder-only."""
  if isinstance(model, LLMToSLM):
    return Hybrid(model, slm=adapter_for(model.slm))
  if isinstance(model, T5):
    return EncoderDecoder(model)
  return DecoderOnly(model)
