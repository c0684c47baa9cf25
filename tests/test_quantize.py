"""Weight-only int8 decoding (l2s_jax.quantize, `decode.weights='int8'`).

Reference: the transformers (PyTorch) model whose weight matrices were quantized by hand in
torch, per output channel by qwix's documented int8 convention (scale = max |w| over the
input axis / 127.5, values rounded to integers clipped to [-128, 127]): its logits and greedy
tokens must be ours with int8 weights.
"""

import numpy as np
import pytest
import torch

import torch_reference as ref
from l2s_jax import hf, quantize
from l2s_jax.decoding import generate


def _weight_matrices(model: torch.nn.Module):
  """(param, its input axis) of every weight matrix (not the position tables). Linear and
  Embedding weights hold an output channel (a token row for an embedding) per row; GPT-2's
  Conv1D one per column."""
  from transformers.pytorch_utils import Conv1D

  owners = {
    f"{m}.{n}" if m else n: mod
    for m, mod in model.named_modules()
    for n, _ in mod.named_parameters(recurse=False)
  }
  for name, p in model.named_parameters():
    if p.ndim == 2 and "wpe" not in name and "relative_attention_bias" not in name:
      yield p, 0 if isinstance(owners[name], Conv1D) else 1


def on_power_of_two_scales(model: torch.nn.Module) -> torch.nn.Module:
  """Each output channel rescaled (by a factor in [0.7, 1.4]) so that its largest |w| is
  127.5 * 2^-k: the int8 scale is then a power of two, w / scale is exact in float32 however
  it is computed, and the reference cannot differ from qwix by a rounding of the division
  (the largest element sits exactly on the +-127.5 tie, which rounds half to even in both)."""
  with torch.no_grad():
    for p, axis in _weight_matrices(model):
      a = p.abs().amax(dim=axis, keepdim=True)
      target = 127.5 * torch.exp2(-torch.round(torch.log2(127.5 / a)))
      p.mul_(target / a)
      top = p.abs().argmax(dim=axis, keepdim=True)
      p.scatter_(axis, top, torch.sign(p.gather(axis, top)) * target)
  return model


def hand_int8(model: torch.nn.Module) -> torch.nn.Module:
  """Every weight matrix replaced by its int8 per-output-channel reconstruction q * scale."""
  with torch.no_grad():
    for p, axis in _weight_matrices(model):
      scale = p.abs().amax(dim=axis, keepdim=True) / 127.5
      p.copy_(torch.clamp(torch.round(p / scale), -128, 127) * scale)
  return model


def _load(tm, tmp_path):
  tm.save_pretrained(tmp_path)
  return hf.load(str(tmp_path))


FAMILIES = {  # T5: transformers' generate needs equal encoder and decoder stacks
  "gpt2": lambda: ref.gpt2(seed=3),
  "qwen2": lambda: ref.qwen2(seed=3),  # biased q/k/v, untied head
  "t5": lambda: ref.t5("t5", seed=3, num_decoder_layers=2),  # tied, scaled head
  "t5v1_1": lambda: ref.t5("t5v1_1", seed=3, num_decoder_layers=2),  # gated, untied head
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_int8_greedy_and_logits_match_hand_quantized_transformers(family, tmp_path):
  tm = on_power_of_two_scales(FAMILIES[family]())
  model, params = _load(tm, tmp_path)
  q = quantize.quantize_weights(params, "int8")
  leaves = [
    x
    for x in __import__("jax").tree.leaves(q, is_leaf=quantize.is_quantized)
    if quantize.is_quantized(x)
  ]
  assert leaves and all(x.qvalue.dtype == np.int8 for x in leaves)
  assert quantize.nbytes(q) < 0.4 * quantize.nbytes(params)
  reference = hand_int8(tm)
  encdec = family.startswith("t5")
  ids, mask = ref.padded_batch(5, 3, 7, 97, right_pad=[(1, 2)])
  if encdec:
    dec = np.array([[0, 5, 9, 11]] * 3, np.int32)
    ours = ref.jitted(model)(q, ids, mask, dec)
    theirs = ref.torch_logits(reference, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    plain = ref.jitted(model)(params, ids, mask, dec)
  else:
    ours = ref.jitted(model)(q, ids, mask)
    theirs = ref.torch_logits(reference, input_ids=ids, attention_mask=mask)
    plain = ref.jitted(model)(params, ids, mask)
  keep = mask.astype(bool) if not encdec else np.ones(ours.shape[:2], bool)
  np.testing.assert_allclose(np.asarray(ours)[keep], theirs[keep], atol=2e-4, rtol=2e-4)
  # ... and int8 is not the float model: the comparison can tell them apart.
  assert np.abs(np.asarray(plain)[keep] - theirs[keep]).max() > 1e-3
  # Greedy decoding through the cache (prefill, then one step at a time); prompts unpadded,
  # as transformers' decoder-only generate expects left padding (ours takes either).
  ids, mask = ref.padded_batch(6, 3, 7, 97)
  out = generate(model, q, ids, mask, max_new_tokens=6, eos_id=1, prompt_buckets=None)
  expected = ref.torch_greedy(reference, ids, mask, 6, encoder_decoder=encdec)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_stored_is_the_identity_and_bad_values_are_named():
  params = {"w": np.ones((2, 2), np.float32)}
  assert quantize.quantize_weights(params, "stored") is params
  with pytest.raises(ValueError, match="decode.weights 'int4'"):
    quantize.quantize_weights(params, "int4")


def test_which_weights_are_quantized():
  import jax.numpy as jnp

  m = jnp.zeros((4, 4))
  assert quantize.quantizes("qkv", jnp.zeros((4, 3, 2, 2)))
  assert quantize.quantizes("embedding", m) and quantize.quantizes("lm_head", m)
  for name in ("wpe", "relative_attention_bias", "qkv_bias", "q_bias"):
    assert not quantize.quantizes(name, m)
  assert not quantize.quantizes("scale", jnp.zeros((4,)))
  assert quantize.output_axes("o", 3) == (2,) and quantize.output_axes("q", 3) == (1, 2)
  assert quantize.output_axes("embedding", 2) == (0,)
