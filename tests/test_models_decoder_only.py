"""GPT-2, Qwen2 and Llama: logits, incremental decoding, save round trip, rope scaling."""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest

import torch_reference as ref
from helpers import record_query_widths
from l2s_jax import hf
from l2s_jax.decoding import generate
from l2s_jax.models.rope import RopeScaling

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
    np.testing.assert_allclose(
      np.asarray(logits[:, 0]), full[rows, lengths + t], atol=TOL, err_msg=f"step {t}"
    )
  # Several tokens at once (the speculative-decoding verify step) agree too.
  logits3, cache = extend(params, ids[rows[:, None], lengths[:, None] + 16 + np.arange(3)], cache)
  np.testing.assert_allclose(
    np.asarray(logits3), full[rows[:, None], lengths[:, None] + 16 + np.arange(3)], atol=TOL
  )
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


# --- rope scaling ----------------------------------------------------------------------------

ROPE_CASES = [(fam, t) for fam in ("llama", "qwen2") for t in sorted(ref.ROPE)]


def _old_style_config(path):
  """Rewrites config.json the way older hub configs spell rope (Qwen2.5, Llama 3.1):
  top-level rope_theta, a `rope_scaling` dict with the legacy `type` key."""
  cfg = json.loads((path / "config.json").read_text())
  params = dict(cfg.pop("rope_parameters"))
  cfg["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")
  cfg["rope_scaling"] = params
  (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=ROPE_CASES, ids=[f"{f}-{t}" for f, t in ROPE_CASES])
def rope_pair(request, tmp_path_factory):
  """(family, rope type, directory, our model, params). Qwen2 directories carry the older
  `rope_scaling` spelling, Llama ones transformers 5.x's `rope_parameters`; the reference is
  always transformers reading that same directory."""
  family, rope_type = request.param
  path = tmp_path_factory.mktemp(f"{family}-{rope_type}")
  ref.rope_model(family, rope_type).save_pretrained(path)
  if family == "qwen2":
    _old_style_config(path)
  model, params = hf.load(str(path))
  return family, rope_type, path, model, params


def _reference(family, path):
  """A fresh transformers model: dynamic rope keeps state between calls (the longest length
  seen), so each comparison starts from a model that has seen nothing."""
  import transformers as tf

  return getattr(tf, FAMILIES[family][1]).from_pretrained(path).eval()


def test_rope_scaling_is_read(rope_pair):
  family, rope_type, _, model, _ = rope_pair
  s = model.config.rope_scaling
  assert (s.rope_type, model.config.rope_theta) == (rope_type, 500.0)
  assert s.factor == ref.ROPE[rope_type]["factor"]
  if rope_type in ("llama3", "yarn"):
    assert s.original_max_position_embeddings == 16


def test_rope_scaling_logits_match_transformers_with_padding(rope_pair):
  """48 tokens: past original_max_position_embeddings (16) and, for dynamic, past
  max_position_embeddings (32), so every variant really rescales; the same model with
  default rope is far off, so the comparison would catch a scaling left out."""
  family, rope_type, path, model, params = rope_pair
  ids, mask = ref.padded_batch(0, 3, 48, 97, left_pad=[(1, 9)], right_pad=[(2, 13)])
  expected = ref.torch_logits(_reference(family, path), input_ids=ids, attention_mask=mask)
  got = np.asarray(ref.jitted(model)(params, ids, mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
  plain = model.clone(config=dataclasses.replace(model.config, rope_scaling=RopeScaling()))
  unscaled = np.asarray(ref.jitted(plain)(params, ids, mask))
  assert np.abs(unscaled[valid] - expected[valid]).max() > 0.05


@pytest.mark.parametrize("width, n_new", [(20, 20), (36, 10)])
def test_rope_scaling_greedy_equals_transformers(rope_pair, width, n_new):
  """Left-padded prompts. (20, 20): generation crosses position 32, where dynamic NTK starts
  growing theta at every step (keys already cached keep their rotation, as in transformers).
  (36, 10): the longest prompt is already past 32 and its bucketed width (64) is not what
  counts (transformers sees 36)."""
  family, _, path, model, params = rope_pair
  ids, mask = ref.padded_batch(1, 3, width, 97, left_pad=[(0, 6), (2, 3)])
  expected = ref.torch_greedy(_reference(family, path), ids, mask, n_new)
  out = generate(model, params, ids, mask, max_new_tokens=n_new, eos_id=1)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_rope_scaling_greedy_equals_transformers_with_prefill_chunks(rope_pair, monkeypatch):
  """Prompts of 36 positions prefilled in chunks of 6 (dynamic NTK excepted: its rotation
  depends on each call's longest position, so its prompt stays one call, as in transformers)."""
  from l2s_jax.models import causal_lm

  monkeypatch.setattr(causal_lm, "PREFILL_CHUNK_TOKENS", 18)
  monkeypatch.setattr(causal_lm, "PREFILL_MIN_CHUNK", 1)
  family, rope_type, path, model, params = rope_pair
  assert model.prefill_chunk_length(3) == (6 if rope_type != "dynamic" else sys.maxsize)
  ids, mask = ref.padded_batch(1, 3, 36, 97, left_pad=[(0, 6), (2, 3)])
  expected = ref.torch_greedy(_reference(family, path), ids, mask, 10)
  out = generate(model, params, ids, mask, max_new_tokens=10, eos_id=1, prompt_buckets=None)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_rope_scaling_save_round_trip(rope_pair, tmp_path):
  family, _, path, model, params = rope_pair
  hf.save(model, params, str(tmp_path / "out"))
  ids, mask = ref.padded_batch(2, 2, 40, 97, right_pad=[(1, 5)])
  a = ref.torch_logits(_reference(family, path), input_ids=ids, attention_mask=mask)
  b = ref.torch_logits(_reference(family, tmp_path / "out"), input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(a, b, atol=1e-6)
  again, _ = hf.load(str(tmp_path / "out"))
  assert (again.config.rope_scaling, again.config.rope_theta) == (
    model.config.rope_scaling,
    model.config.rope_theta,
  )


def test_long_prompts_prefill_in_chunks(pair, monkeypatch):
  """A prompt wider than `prefill_chunk_length(B)` runs through the blocks in chunks, the last one
  overlapping the one before when the chunk does not divide the width: the same first logits
  (from token ids and from embeddings) and greedy tokens as transformers' whole-prompt run."""
  from l2s_jax.models import causal_lm

  _, torch_model, model, params = pair
  monkeypatch.setattr(causal_lm, "PREFILL_CHUNK_TOKENS", 20)
  monkeypatch.setattr(causal_lm, "PREFILL_MIN_CHUNK", 1)
  assert model.prefill_chunk_length(4) == 5 and model.prefill_chunk_length(40) == 1
  widths = record_query_widths(monkeypatch, 100)
  ids, mask = ref.padded_batch(5, 4, 13, 97, right_pad=[(1, 4), (2, 8), (3, 12)])
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  last = mask.sum(1) - 1  # rows end in chunks 3, 2, 1 and 1
  expected = expected[np.arange(4), last]
  logits, cache = ref.jitted(model, "prefill", max_len=20)(params, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(cache["index"]), last + 1)
  assert widths and set(widths) == {5}  # 13 positions: chunks at 0, 5 and 8
  widths.clear()
  ids6, mask6 = ref.padded_batch(7, 4, 6, 97, right_pad=[(1, 2), (2, 5)])
  expected6 = ref.torch_logits(torch_model, input_ids=ids6, attention_mask=mask6)
  logits6, _ = ref.jitted(model, "prefill", max_len=8)(params, ids6, mask6)
  np.testing.assert_allclose(
    np.asarray(logits6), expected6[np.arange(4), mask6.sum(1) - 1], atol=TOL, rtol=0
  )
  assert widths and set(widths) == {3}  # 6 positions: 2 x 3, not 5 + 5
  embeds = ref.jitted(model, "embed")(params, ids)
  logits = jax.jit(
    lambda p, i, m, e: model.apply(
      {"params": p}, i, m, max_len=20, inputs_embeds=e, method=model.prefill
    )
  )(params, ids, mask, embeds)[0]
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
  ids, mask = ref.padded_batch(6, 4, 12, 97, left_pad=[(1, 3), (3, 7)])
  out = generate(model, params, ids, mask, max_new_tokens=6, eos_id=1, prompt_buckets=None)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref.torch_greedy(torch_model, ids, mask, 6))


def test_long_calls_attend_in_query_blocks(pair, monkeypatch):
  """A call of more than 2 * QUERY_BLOCK queries (a long prefill, a full forward) attends
  block by block, the last block padded: the same logits and greedy tokens as transformers."""
  _, torch_model, model, params = pair
  widths = record_query_widths(monkeypatch, 5)
  ids, mask = ref.padded_batch(0, 4, 24, 97, left_pad=[(1, 7)], right_pad=[(2, 9)])
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  got = np.asarray(ref.jitted(model)(params, ids, mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
  assert widths and set(widths) == {5}  # 24 queries: 5 blocks of 5
  ids, mask = ref.padded_batch(3, 2, 13, 97, left_pad=[(1, 2)])
  out = generate(model, params, ids, mask, max_new_tokens=6, eos_id=1, prompt_buckets=None)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref.torch_greedy(torch_model, ids, mask, 6))
  assert max(widths) == 5 and 1 in widths  # blocked prefill, one-token steps
