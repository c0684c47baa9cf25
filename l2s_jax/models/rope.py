"""Rotary position embeddings and their scaled variants, as transformers 5.x computes them.

transformers' `modeling_rope_utils.py` turns a config's `rope_parameters` into inverse
frequencies inv_freq [H/2] and an attention scaling that multiplies cos and sin (so the
attention logits by its square). The variants published checkpoints use:

  default   theta ** (-2i/H)
  linear    default / factor                                 (position interpolation)
  dynamic   NTK: theta grows with the sequence length once it passes max_position_embeddings
  llama3    low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1+)
  yarn      NTK-by-parts ramp between interpolation and extrapolation, and an attention
            scaling 0.1 ln(factor) + 1 (Qwen2.5 long-context configs)

Everything but `dynamic` is a constant of the config. `dynamic` depends on the sequence
length of each call: as in transformers, seq_len = max(position ids of the call) + 1 over
the whole batch, and only the queries and keys of that call are rotated with it; keys
already in a KV cache keep the rotation they were written with (transformers' DynamicCache
keeps rotated keys too). Inside a jitted decode loop seq_len is traced, so each step uses
its own length without recompiling: prefill max(prompt lengths) (the model's `prefill`
gives padding slots their row's last position, so a bucketed prompt width does not count),
then one more per generated token, which is what transformers' `generate` sees with
left-padded prompts. A full forward without position ids uses T, as transformers does.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from l2s_jax.models.layers import Array

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """transformers' `rope_parameters` without `rope_theta` (LlamaConfig keeps that)."""

  rope_type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None  # llama3, yarn
  low_freq_factor: float | None = None  # llama3
  high_freq_factor: float | None = None  # llama3
  attention_factor: float | None = None  # yarn: None = from factor (and mscale)
  beta_fast: float | None = None  # yarn: None = 32
  beta_slow: float | None = None  # yarn: None = 1
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool = True  # yarn

  def __post_init__(self):
    if self.rope_type not in SUPPORTED:
      raise ValueError(
        f"rope_type {self.rope_type!r} is not supported; supported: {list(SUPPORTED)}"
      )
    if self.rope_type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
      raise ValueError(f"rope_type {self.rope_type!r} needs original_max_position_embeddings")
    if self.rope_type == "llama3" and (
      self.low_freq_factor is None or self.high_freq_factor is None
    ):
      raise ValueError("rope_type 'llama3' needs low_freq_factor and high_freq_factor")


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
  return (
    1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  ).astype(np.float32)


def _llama3_inv_freq(s: RopeScaling, theta: float, dim: int) -> np.ndarray:
  inv_freq = _default_inv_freq(theta, dim)
  old_len = s.original_max_position_embeddings
  low_wavelen = old_len / s.low_freq_factor
  high_wavelen = old_len / s.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
  if s.attention_factor is not None:
    return float(s.attention_factor)
  if s.mscale and s.mscale_all_dim:
    return float(_yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim))
  return _yarn_mscale(s.factor)


def _yarn_inv_freq(s: RopeScaling, theta: float, dim: int) -> np.ndarray:
  beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
  old_len = s.original_max_position_embeddings

  def correction_dim(rotations):
    return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolated = 1.0 / pos_freqs
  interpolated = 1.0 / (np.float32(s.factor) * pos_freqs)
  return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(
    np.float32
  )


def static_inv_freq(s: RopeScaling, theta: float, dim: int) -> np.ndarray:
  """inv_freq [dim/2] of every type but `dynamic` (for which it is the short-sequence value)."""
  if s.rope_type == "linear":
    return (_default_inv_freq(theta, dim) / np.float32(s.factor)).astype(np.float32)
  if s.rope_type == "llama3":
    return _llama3_inv_freq(s, theta, dim)
  if s.rope_type == "yarn":
    return _yarn_inv_freq(s, theta, dim)
  return _default_inv_freq(theta, dim)


def attention_scaling(s: RopeScaling) -> float:
  """The factor transformers multiplies cos and sin by."""
  return yarn_attention_factor(s) if s.rope_type == "yarn" else 1.0


def dynamic_inv_freq(
  s: RopeScaling, theta: float, dim: int, max_position_embeddings: int, positions_BT: Array
) -> Array:
  """NTK-aware inv_freq [dim/2] for this call's length, max(positions) + 1 (traced)."""
  seq_len = jnp.maximum(jnp.max(positions_BT) + 1, max_position_embeddings).astype(jnp.float32)
  growth = (s.factor * seq_len / max_position_embeddings) - (s.factor - 1)
  base = theta * growth ** (dim / (dim - 2))
  return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def inv_freq_for(
  s: RopeScaling, theta: float, dim: int, max_position_embeddings: int, positions_BT: Array
) -> Array:
  if s.rope_type == "dynamic":
    return dynamic_inv_freq(s, theta, dim, max_position_embeddings, positions_BT)
  return jnp.asarray(static_inv_freq(s, theta, dim))


def apply_rotary(x_BTNH: Array, positions_BT: Array, inv_freq: Array, scale: float = 1.0) -> Array:
  """Rotary embedding in transformers' rotate-half layout (pairs i, i + H/2); cos and sin
  are multiplied by `scale` (yarn's attention factor) as transformers does."""
  h = x_BTNH.shape[-1]
  freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
  cos = (jnp.cos(angles) * scale).astype(x_BTNH.dtype)
  sin = (jnp.sin(angles) * scale).astype(x_BTNH.dtype)
  x1, x2 = x_BTNH[..., : h // 2], x_BTNH[..., h // 2 :]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BTNH * cos + rotated * sin
