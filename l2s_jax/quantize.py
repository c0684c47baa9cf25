"""Weight-only int8 decoding with qwix (`decode.weights='int8'`).

Every weight matrix a model multiplies by (attention and feed-forward kernels, the hybrid's
projector, the output head and the token-embedding table that GPT-2 and T5 also use as the
output head) is stored as int8 with one scale per output channel: a `qwix.QArray` (absmax
calibration: scale = max |w| over the input axes / 127). Activations, norms, biases, position
tables and T5's relative-position bias stay in the compute dtype. `layers.project` and
`layers.Embed` multiply a QArray through `qwix.dot_general`, which dequantizes the weight into
the compute dtype and runs the float product. On GPU and TPU XLA fuses the dequantization into
the product; XLA:CPU instead hoists it out of the decoding `while_loop`, so there the loop reads
dequantized float copies and int8 is no faster (docs/benchmarks.md).

qwix is the maintained JAX quantization library (Google); it also offers quantization-aware
training and int4/fp8 types, which this module can adopt by changing `QTYPES`. Its model-level
interception (`qwix.quantize_model`) rewrites flax modules' `param`/einsum calls; our kernels
are reshaped into one 2-D product each (`layers.project`), so the params are quantized here as
an explicit tree and the two call sites take QArrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix

QTYPES = {"int8": jnp.int8}  # decode.weights -> the stored type (beside "stored")
# Read a few rows per step (by position or bucket), not multiplied by: kept in float.
KEEP_FLOAT = ("wpe", "relative_attention_bias")
# Kernels that contract two input axes ([heads, head_dim, D]); every other kernel one.
TWO_INPUT_AXES = ("o",)


def output_axes(name: str, ndim: int) -> tuple[int, ...]:
  """The axes of a weight that get their own scale: the product's output channels. The
  embedding table [V, D] is read by rows (lookup) and as the output head (D -> V): a scale
  per token row serves both."""
  if name == "embedding":
    return (0,)
  return tuple(range(2 if name in TWO_INPUT_AXES else 1, ndim))


def quantizes(name: str, x) -> bool:
  """Whether a param leaf `name` is a weight matrix that `quantize_weights` stores in int8."""
  return (
    hasattr(x, "ndim")
    and x.ndim >= 2
    and jnp.issubdtype(x.dtype, jnp.floating)
    and not name.endswith("bias")
    and name not in KEEP_FLOAT
  )


def quantize_weights(params, weights: str):
  """`params` with every weight matrix quantized as `weights` says ("stored": unchanged)."""
  if weights != "stored" and weights not in QTYPES:
    raise ValueError(f"decode.weights {weights!r}: use stored or one of {', '.join(QTYPES)}")
  if weights == "stored":
    return params

  def one(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if not quantizes(name, x):
      return x
    return qwix.quantize(x, QTYPES[weights], channelwise_axes=output_axes(name, x.ndim))

  return jax.jit(lambda p: jax.tree_util.tree_map_with_path(one, p))(params)


def is_quantized(w) -> bool:
  return isinstance(w, qwix.QArray)


def dot_general(x, w, dimension_numbers):
  """`jax.lax.dot_general(x, w, ...)` for a quantized weight `w` (output in x's dtype)."""
  return qwix.dot_general(x, w.astype(x.dtype), dimension_numbers)


def take_rows(w, ids):
  """Rows `ids` of a quantized table, dequantized: `jnp.take(table, ids, axis=0)`."""
  return qwix.dequantize(w[ids])


def nbytes(params) -> int:
  """Bytes the params occupy (int8 values and their scales counted as stored)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
