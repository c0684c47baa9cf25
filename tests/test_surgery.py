"""Function-preserving model surgery (l2s_jax.models.surgery): grown models compute the
original function at out_scale 0, something else otherwise, with the hand-counted sizes."""

import dataclasses

import jax
import numpy as np
import pytest

import torch_reference as ref
from l2s_jax.models import T5, count_params, init_params, t5
from l2s_jax.models.surgery import add_decoder_layers, widen_ffn

D, F, ENC, DEC = 16, 24, 2, 2


def _model(preset):
  cfg = dataclasses.replace(
    t5.PRESETS[preset],
    vocab_size=50,
    d_model=D,
    d_kv=4,
    d_ff=F,
    num_layers=ENC,
    num_decoder_layers=DEC,
    num_heads=4,
  )
  model = T5(cfg)
  return model, init_params(model, jax.random.PRNGKey(3))


def _logits(model, params):
  ids, mask = ref.padded_batch(0, 3, 7, 50, right_pad=[(1, 2)])
  dec = ref.padded_batch(1, 3, 5, 50)[0]
  return np.asarray(ref.jitted(model)(params, ids, mask, dec))


@pytest.mark.parametrize("preset, ffn_kernels", [("t5-small", 2), ("t5-v1_1-small", 3)])
def test_widen_ffn(preset, ffn_kernels):
  model, params = _model(preset)
  before = _logits(model, params)
  wide, wide_params = widen_ffn(model, params, 64, out_scale=0.0)
  assert wide.config.d_ff == 64
  # Every FFN block (ENC + DEC of them) gains (64 - F) units of ffn_kernels D-vectors each.
  assert count_params(wide_params) - count_params(params) == (ENC + DEC) * ffn_kernels * D * (
    64 - F
  )
  np.testing.assert_allclose(_logits(wide, wide_params), before, atol=1e-5)
  assert np.abs(before).max() > 1e-3
  noisy, noisy_params = widen_ffn(model, params, 64, out_scale=0.5, seed=1)
  assert np.abs(_logits(noisy, noisy_params) - before).max() > 1e-3
  with pytest.raises(ValueError, match="d_ff 24 must exceed the model's d_ff 24"):
    widen_ffn(model, params, F)


def test_add_decoder_layers():
  model, params = _model("t5-small")
  before = _logits(model, params)
  deep, deep_params = add_decoder_layers(model, params, 2, out_scale=0.0)
  assert deep.config.num_decoder_layers == DEC + 2
  layer = count_params(params["decoder"][f"layers_{DEC - 1}"])
  assert count_params(deep_params) - count_params(params) == 2 * layer
  np.testing.assert_allclose(_logits(deep, deep_params), before, atol=1e-5)
  # The new layers are copies of the last one but for their outputs into the stream.
  new = deep_params["decoder"][f"layers_{DEC}"]
  old = params["decoder"][f"layers_{DEC - 1}"]
  np.testing.assert_array_equal(new["self_attention"]["q"], old["self_attention"]["q"])
  assert not np.asarray(new["mlp"]["wo"]).any()
  noisy, noisy_params = add_decoder_layers(model, params, 1, out_scale=0.1, seed=2)
  assert np.abs(_logits(noisy, noisy_params) - before).max() > 1e-4
  with pytest.raises(ValueError, match="has no decoder"):
    add_decoder_layers(T5(model.config, encoder_only=True), params, 1)
