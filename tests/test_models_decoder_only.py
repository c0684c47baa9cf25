"""GPT-2, Qwen2 and Llama: logits, incremental decoding, save round trip."""

import numpy as np
import pytest

import torch_reference as ref
from l2s_jax import hf

TOL = 1e-4
FAMILIES = {
    "gpt2": (ref.gpt2, "GPT2LMHeadModel"),
    "qwen2": (ref.qwen2, "Qwen2ForCausalLM"),
    "llama": (ref.llama, "LlamaForCausalLM"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
  make, _ = FAMILIES[request.param]
  torch_model = make()
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  model, params = hf.load(str(path))
  return request.param, torch_model, model, params


def test_logits_match_transformers_with_padding(pair):
  _, torch_model, model, params = pair
  ids, mask = ref.padded_batch(0, 4, 24, 97, left_pad=[(1, 7)], right_pad=[(2, 9)])
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  got = np.asarray(ref.jitted(model)(params, ids, mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
  assert np.abs(expected).max() > 1.0


def test_logits_match_with_explicit_positions(pair):
  """Left-padded rows with positions counted from the first real token (as generate does)."""
  _, torch_model, model, params = pair
  ids, mask = ref.padded_batch(1, 2, 16, 97, left_pad=[(0, 5)])
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask, position_ids=pos)
  got = np.asarray(ref.jitted(model)(params, ids, mask, pos))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)


def test_incremental_decoding_reproduces_full_forward(pair):
  _, _, model, params = pair
  ids, _ = ref.padded_batch(2, 3, 32, 97)
  lengths = np.array([10, 4, 12])
  full = np.asarray(ref.jitted(model)(params, ids))
  prompt_mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  prompt = ids[:, :12] * prompt_mask
  logits, cache = ref.jitted(model, "prefill", max_len=40)(params, prompt, prompt_mask)
  rows = np.arange(3)
  np.testing.assert_allclose(np.asarray(logits), full[rows, lengths - 1], atol=TOL)
  extend = ref.jitted(model, "extend")
  for t in range(16):
    tok = ids[rows, lengths + t][:, None]
    logits, cache = extend(params, tok, cache)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[rows, lengths + t], atol=TOL,
                               err_msg=f"step {t}")
  # Several tokens at once (the speculative-decoding verify step) agree too.
  logits3, cache = extend(params, ids[rows[:, None], lengths[:, None] + 16 + np.arange(3)], cache)
  np.testing.assert_allclose(np.asarray(logits3),
                             full[rows[:, None], lengths[:, None] + 16 + np.arange(3)], atol=TOL)
  np.testing.assert_array_equal(np.asarray(cache["index"]), lengths + 19)


def test_save_then_transformers_loads_same_logits(pair, tmp_path):
  name, torch_model, model, params = pair
  import transformers as tf
  hf.save(model, params, str(tmp_path / "out"))
  reloaded = getattr(tf, FAMILIES[name][1]).from_pretrained(tmp_path / "out").eval()
  ids, mask = ref.padded_batch(3, 2, 13, 97, right_pad=[(1, 3)])
  a = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  b = ref.torch_logits(reloaded, input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(a, b, atol=1e-6)
