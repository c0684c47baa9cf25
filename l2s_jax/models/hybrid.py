"""LLM-to-SLM (Bergner et al., 2024): a frozen large encoder guides a small generator.

  H = llm.encode(prompt)            [B, M, D_llm]   once per prompt, frozen
  Z = projector(H)                  [B, M, D_slm]   Linear -> ReLU -> Linear
  Z' = pool(Z)                      [B, P, D_slm]   onto the SLM's prompt tokens
  E = embed_slm(prompt) + Z'        ("add"; "replace": E = Z' on prompt tokens)

The small model then runs as usual from E: a T5 SLM gets E at its encoder
input; a decoder-only SLM gets it at the prompt positions only (response
positions get nothing, in training and in generation).

Pooling: with a shared tokenizer, LLM token i feeds SLM prompt token i. With
different tokenizers, `overlap` [B, P, M] marks which LLM tokens' character
spans overlap each SLM token, and each SLM token receives their mean.

Param tree: llm/ (frozen T5 encoder), projector/{in, in_bias, out, out_bias}, slm/.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2s_jax.models import layers
from l2s_jax.models.layers import Array, param
from l2s_jax.models.t5 import T5

Cache = dict[str, Any]
MODES = ("add", "replace")


class Projector(nn.Module):
  """Linear(D_llm -> F) -> ReLU -> Linear(F -> D_slm).

  `zero_init_out` starts the output layer at zero, so that a fresh hybrid
  in "add" mode is exactly its SLM.
  """

  llm_dim: int
  slm_dim: int
  hidden_dim: int
  zero_init_out: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BMD: Array) -> Array:
    dt, pd = self.dtype, self.param_dtype
    w_in = param(
      self,
      "in",
      nn.initializers.lecun_normal(),
      (self.llm_dim, self.hidden_dim),
      ("embed_llm", "mlp"),
      pd,
    )
    b_in = param(self, "in_bias", nn.initializers.zeros, (self.hidden_dim,), ("mlp",), pd)
    out_init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
    w_out = param(self, "out", out_init, (self.hidden_dim, self.slm_dim), ("mlp", "embed"), pd)
    b_out = param(self, "out_bias", nn.initializers.zeros, (self.slm_dim,), ("embed",), pd)
    x = jax.nn.relu(layers.project(h_BMD.astype(dt), w_in.astype(dt)) + b_in.astype(dt))
    return layers.project(x, w_out.astype(dt)) + b_out.astype(dt)


def model_width(model: nn.Module) -> int:
  c = model.config
  for field in ("d_model", "n_embd", "hidden_size"):
    if hasattr(c, field):
      return int(getattr(c, field))
  raise TypeError(f"cannot tell the width of {type(model).__name__}")


def pool_to_slm(
  z_BMD: Array, length: int, llm_mask_BM: Array | None, overlap_BPM: Array | None
) -> Array:
  """Moves projected LLM states onto `length` SLM token positions: [B, length, D].

  overlap None (shared tokenizer): LLM token i -> SLM token i, zeros past M.
  Otherwise each SLM row gets the mean over the LLM tokens it overlaps
  (zeros for rows that overlap nothing: response, padding, special tokens).
  """
  b, m, d = z_BMD.shape
  if llm_mask_BM is not None:
    z_BMD = z_BMD * llm_mask_BM[..., None].astype(z_BMD.dtype)
  if overlap_BPM is None:
    if m >= length:
      return z_BMD[:, :length]
    return jnp.pad(z_BMD, ((0, 0), (0, length - m), (0, 0)))
  w = overlap_BPM.astype(layers.accum_dtype(z_BMD.dtype))
  if llm_mask_BM is not None:
    w = w * llm_mask_BM[:, None, :].astype(w.dtype)
  p = w.shape[1]
  if p > length:
    w = w[:, :length]
  elif p < length:
    w = jnp.pad(w, ((0, 0), (0, length - p), (0, 0)))
  w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1.0)
  return jnp.einsum("BPM,BMD->BPD", w.astype(z_BMD.dtype), z_BMD)


class LLMToSLM(nn.Module):
  """The hybrid. `llm` must be a T5 (usually `encoder_only=True`)."""

  llm: T5
  slm: nn.Module
  projector_hidden: int | None = None  # None: the SLM's width (as the paper)
  mode: str = "add"
  zero_init_projector: bool = False
  dtype: Any = jnp.float32
  # Prefill inputs indexed by SLM prompt position: generation moves them with the prompt
  # ids when it re-lays left-padded prompts (l2s_jax.decoding.request).
  prompt_aligned_inputs = ("overlap",)

  def setup(self):
    if self.mode not in MODES:
      raise ValueError(f"hybrid mode {self.mode!r}; use one of {MODES}")
    slm_dim = model_width(self.slm)
    self.projector = Projector(
      model_width(self.llm),
      slm_dim,
      self.projector_hidden or slm_dim,
      self.zero_init_projector,
      dtype=self.dtype,
    )

  @property
  def config(self):
    """The SLM's config: generation reads the vocabulary and ids from it."""
    return self.slm.config

  @property
  def max_positions(self):
    return getattr(self.slm, "max_positions", None)

  @property
  def is_encoder_decoder(self) -> bool:
    return isinstance(self.slm, T5)

  def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
    return self.slm.cache_length(prompt_len, max_new_tokens)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    return self.slm.init_cache(batch, max_len, dtype)

  # --- the method --------------------------------------------------------

  def project_llm_states(self, llm_input_ids: Array, llm_attention_mask: Array) -> Array:
    """Z = projector(H), [B, M, D_slm]; no gradient reaches the LLM."""
    h = self.llm.encode(llm_input_ids, llm_attention_mask)
    return self.projector(jax.lax.stop_gradient(h))

  def slm_inputs_embeds(
    self,
    input_ids: Array,
    attention_mask: Array | None,
    llm_input_ids: Array,
    llm_attention_mask: Array,
    overlap: Array | None = None,
    prompt_mask: Array | None = None,
  ) -> Array:
    """The SLM's input embeddings [B, T, D] with the LLM's guidance applied.

    prompt_mask [B, T] marks the positions Z may touch (default: all that
    `attention_mask` marks, i.e. the whole SLM input of a T5 SLM). For a
    decoder-only SLM pass the prompt positions, so the response gets nothing.
    """
    t = input_ids.shape[1]
    z = pool_to_slm(
      self.project_llm_states(llm_input_ids, llm_attention_mask), t, llm_attention_mask, overlap
    )
    e = self.slm.embed(input_ids)
    if prompt_mask is None:
      prompt_mask = attention_mask if attention_mask is not None else jnp.ones_like(input_ids)
    where = prompt_mask.astype(bool)[..., None]
    z = jnp.where(where, z.astype(e.dtype), 0)
    if self.mode == "add":
      return e + z
    return jnp.where(where, z, e)

  # --- forward, as for training -----------------------------------------

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    decoder_input_ids: Array | None = None,
    *,
    llm_input_ids: Array,
    llm_attention_mask: Array,
    overlap: Array | None = None,
    prompt_mask: Array | None = None,
  ) -> Array:
    """Logits [B, T, V] of the SLM under the LLM's guidance.

    T5 SLM: input_ids is the prompt, decoder_input_ids the shifted target.
    Decoder-only SLM: input_ids is prompt + response; give `prompt_mask`
    (1 on prompt tokens) so that Z lands on the prompt only.
    """
    embeds = self.slm_inputs_embeds(
      input_ids, attention_mask, llm_input_ids, llm_attention_mask, overlap, prompt_mask
    )
    if self.is_encoder_decoder:
      return self.slm(None, attention_mask, decoder_input_ids, inputs_embeds=embeds)
    if prompt_mask is None:
      raise ValueError("a decoder-only SLM needs prompt_mask (1 on prompt tokens)")
    return self.slm(None, attention_mask, inputs_embeds=embeds)

  # --- generation protocol ------------------------------------------------

  def prefill(
    self,
    input_ids: Array,
    attention_mask: Array,
    *,
    max_len: int,
    llm_input_ids: Array,
    llm_attention_mask: Array,
    overlap: Array | None = None,
  ) -> tuple[Array, Cache]:
    """Runs the LLM encoder and projector once, then the SLM's own prefill.

    `input_ids` are the SLM prompts right-padded (as `generate` passes them);
    `llm_input_ids` / `overlap` describe the same prompts, unshifted.
    """
    embeds = self.slm_inputs_embeds(
      input_ids, attention_mask, llm_input_ids, llm_attention_mask, overlap
    )
    return self.slm.prefill(input_ids, attention_mask, max_len=max_len, inputs_embeds=embeds)

  def extend(self, tokens_BT: Array, cache: Cache) -> tuple[Array, Cache]:
    return self.slm.extend(tokens_BT, cache)
