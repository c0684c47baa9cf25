"""Function-preserving model surgery on T5: wider feed-forward blocks, more decoder layers.

Both add units whose contribution to the residual stream is `out_scale` x a
random matrix scaled like the existing weights; at `out_scale` 0 the grown
model computes exactly the original function (Net2WiderNet-style growth),
so it can be trained on from there, or used as a larger model with known
behaviour (the speculative-decoding bench's verifiers).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from l2s_jax.models.t5 import T5

# The FFN's input kernels (ReLU: wi; gated: wi_0, wi_1) grow along their output
# axis, its output kernel `wo` along its input axis.
_FFN_IN, _FFN_OUT = ("wi", "wi_0", "wi_1"), "wo"
# Outputs of a decoder layer into the residual stream: attention `o` and FFN `wo`.
_LAYER_OUTPUTS = ("o", "wo")


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def widen_ffn(model: T5, params, d_ff: int, *, out_scale: float = 0.0, seed: int = 0):
  """(T5 with every feed-forward block `d_ff` wide, its params).

  New hidden units: input columns random (std of the old ones), output rows
  `out_scale` x random (std of the old ones). Raises ValueError if `d_ff`
  does not grow the model, or a kernel does not have the model's d_ff.
  """
  old = model.config.d_ff
  if d_ff <= old:
    raise ValueError(f"widen_ffn: d_ff {d_ff} must exceed the model's d_ff {old}")
  key = jax.random.PRNGKey(seed)

  def grow(path, x):
    nonlocal key
    name = _leaf_name(path)
    if name not in _FFN_IN + (_FFN_OUT,):
      return x
    axis = 0 if name == _FFN_OUT else 1
    if x.shape[axis] != old:
      raise ValueError(
        f"widen_ffn: {jax.tree_util.keystr(path)} has shape {x.shape}, "
        f"expected d_ff {old} on axis {axis}"
      )
    shape = list(x.shape)
    shape[axis] = d_ff - old
    key, sub = jax.random.split(key)
    scale = out_scale if name == _FFN_OUT else 1.0
    extra = scale * jnp.std(x) * jax.random.normal(sub, shape, x.dtype)
    return jnp.concatenate([x, extra.astype(x.dtype)], axis=axis)

  wide = model.clone(config=dataclasses.replace(model.config, d_ff=d_ff))
  return wide, jax.tree_util.tree_map_with_path(grow, params)


def add_decoder_layers(model: T5, params, extra: int, *, out_scale: float = 0.0, seed: int = 0):
  """(T5 with `extra` more decoder layers, its params).

  Each new layer copies the last one, with its attention and FFN output
  kernels replaced by `out_scale` x random (std of the copied kernel): at 0
  the layer adds nothing to the residual stream.
  """
  if extra < 1:
    raise ValueError(f"add_decoder_layers: extra={extra} must be >= 1")
  if model.encoder_only:
    raise ValueError("add_decoder_layers: the model has no decoder")
  n = model.config.num_decoder_layers
  decoder = dict(params["decoder"])
  last = decoder.get(f"layers_{n - 1}")
  if last is None:
    raise KeyError(
      f"add_decoder_layers: no decoder/layers_{n - 1} in the params ({sorted(decoder)[:5]})"
    )
  key = jax.random.PRNGKey(seed)
  for i in range(extra):

    def replace_output(path, x):
      nonlocal key
      if _leaf_name(path) not in _LAYER_OUTPUTS:
        return x
      key, sub = jax.random.split(key)
      return (out_scale * jnp.std(x) * jax.random.normal(sub, x.shape, x.dtype)).astype(x.dtype)

    decoder[f"layers_{n + i}"] = jax.tree_util.tree_map_with_path(replace_output, last)
  deep = model.clone(config=dataclasses.replace(model.config, num_decoder_layers=n + extra))
  return deep, {**params, "decoder": decoder}
