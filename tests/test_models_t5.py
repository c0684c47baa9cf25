"""T5 family (T5, T5 v1.1, Flan-T5, mT5): logits, incremental decoding, greedy decoding and
save round trip vs transformers."""

import json

import numpy as np
import pytest
import transformers as tf

import torch_reference as ref
from helpers import record_query_widths
from l2s_jax import hf
from l2s_jax.decoding import generate

TOL = 1e-4

# variant -> (torch_reference kind, config.json as the published checkpoints spell it)
VARIANTS = {
  "t5": ("t5", False),
  "t5v1_1": ("t5v1_1", False),  # as transformers 5.x saves it (tie true, scale false)
  "flan-t5": ("t5v1_1", True),  # google/flan-t5-*: tie_word_embeddings false, no scale key
  "mt5": ("mt5", False),  # MT5 as 5.x builds and saves it: tied head, never scaled
  "mt5-untied": ("mt5-untied", True),  # google/mt5-*: own head, tie_word_embeddings false
}
# What each variant must load as: (feed_forward_proj, tied head, scaled output, model_type).
EXPECTED = {
  "t5": ("relu", True, True, "t5"),
  "t5v1_1": ("gated-gelu", False, False, "t5"),
  "flan-t5": ("gated-gelu", False, False, "t5"),
  "mt5": ("gated-gelu", True, False, "mt5"),
  "mt5-untied": ("gated-gelu", False, False, "mt5"),
}


def _classes(path):
  """transformers' (conditional generation, encoder) classes of a directory."""
  mt5 = json.loads((path / "config.json").read_text())["model_type"] == "mt5"
  return (
    (tf.MT5ForConditionalGeneration, tf.MT5EncoderModel)
    if mt5
    else (tf.T5ForConditionalGeneration, tf.T5EncoderModel)
  )


def _save(variant, path, **overrides):
  """Saves the variant's random model; returns transformers' reading of the directory."""
  kind, hub_style = VARIANTS[variant]
  ref.t5(kind, **overrides).save_pretrained(path)
  if hub_style:
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("scale_decoder_outputs", None)
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
  return _classes(path)[0].from_pretrained(path).eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5_pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  torch_model = _save(request.param, path)
  model, params = hf.load(str(path))
  return request.param, torch_model, model, params, path


def test_config_variant_is_really_read(t5_pair):
  kind, _, model, _, _ = t5_pair
  c = model.config
  assert (
    c.feed_forward_proj,
    c.tie_word_embeddings,
    c.scale_decoder_outputs,
    c.model_type,
  ) == EXPECTED[kind]
  assert (c.num_layers, c.num_decoder_layers) == (2, 3)


def test_logits_match_transformers_with_padding(t5_pair):
  _, torch_model, model, params, _ = t5_pair
  ids, mask = ref.padded_batch(0, 3, 30, 97, right_pad=[(1, 10)], left_pad=[(2, 4)])
  dec, dec_mask = ref.padded_batch(1, 3, 12, 97, right_pad=[(0, 3)])
  expected = ref.torch_logits(
    torch_model,
    input_ids=ids,
    attention_mask=mask,
    decoder_input_ids=dec,
    decoder_attention_mask=dec_mask,
  )
  got = np.asarray(ref.jitted(model)(params, ids, mask, dec, dec_mask))
  assert got.shape == expected.shape == (3, 12, 97)
  valid = dec_mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
  assert np.abs(expected).max() > 1.0  # the comparison is not between near-zeros


def test_encoder_matches_transformers(t5_pair):
  _, torch_model, model, params, _ = t5_pair
  import torch

  ids, mask = ref.padded_batch(2, 2, 17, 97, right_pad=[(1, 6)])
  with torch.no_grad():
    expected = torch_model.encoder(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
    ).last_hidden_state.numpy()
  got = np.asarray(ref.jitted(model, "encode")(params, ids, mask))
  np.testing.assert_allclose(got[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL)


def test_long_calls_attend_in_query_blocks(t5_pair, monkeypatch):
  """Encoder and decoder calls of more than 2 * QUERY_BLOCK queries attend block by block (the
  position bias split with them): the same logits as transformers."""
  _, torch_model, model, params, _ = t5_pair
  widths = record_query_widths(monkeypatch, 4)
  ids, mask = ref.padded_batch(0, 3, 30, 97, right_pad=[(1, 10)], left_pad=[(2, 4)])
  dec, dec_mask = ref.padded_batch(1, 3, 12, 97, right_pad=[(0, 3)])
  expected = ref.torch_logits(
    torch_model,
    input_ids=ids,
    attention_mask=mask,
    decoder_input_ids=dec,
    decoder_attention_mask=dec_mask,
  )
  got = np.asarray(ref.jitted(model)(params, ids, mask, dec, dec_mask))
  valid = dec_mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
  assert widths and set(widths) == {4}


def test_incremental_decoding_reproduces_full_forward(t5_pair):
  _, _, model, params, _ = t5_pair
  ids, mask = ref.padded_batch(3, 3, 20, 97, right_pad=[(0, 5), (2, 11)])
  targets, _ = ref.padded_batch(4, 3, 16, 97)
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)
  full = np.asarray(ref.jitted(model)(params, ids, mask, dec_in))
  logits, cache = ref.jitted(model, "prefill", max_len=16)(params, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), full[:, 0], atol=TOL)
  extend = ref.jitted(model, "extend")
  for t in range(15):
    logits, cache = extend(params, targets[:, t : t + 1], cache)
    np.testing.assert_allclose(
      np.asarray(logits[:, 0]), full[:, t + 1], atol=TOL, err_msg=f"step {t}"
    )
  np.testing.assert_array_equal(np.asarray(cache["index"]), [16, 16, 16])


def test_encoder_only_load(t5_pair, tmp_path):
  _, torch_model, _, _, path = t5_pair
  model, params = hf.load(str(path), encoder_only=True)
  assert set(params) == {"shared", "encoder"}
  enc = _classes(path)[1].from_pretrained(path).eval()
  enc.save_pretrained(tmp_path / "enc")
  model2, params2 = hf.load(str(tmp_path / "enc"))
  assert model2.encoder_only
  ids, mask = ref.padded_batch(5, 2, 9, 97, right_pad=[(0, 2)])
  a = ref.jitted(model, "encode")(params, ids, mask)
  b = ref.jitted(model2, "encode")(params2, ids, mask)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_save_then_transformers_loads_same_logits(t5_pair, tmp_path):
  _, torch_model, model, params, _ = t5_pair
  hf.save(model, params, str(tmp_path / "out"))
  assert (
    json.loads((tmp_path / "out" / "config.json").read_text())["model_type"]
    == model.config.model_type
  )
  reloaded = _classes(tmp_path / "out")[0].from_pretrained(tmp_path / "out").eval()
  ids, mask = ref.padded_batch(6, 2, 11, 97, right_pad=[(1, 4)])
  dec, _ = ref.padded_batch(7, 2, 5, 97)
  a = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
  b = ref.torch_logits(reloaded, input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_equals_transformers(variant, tmp_path):
  """Padded prompts; transformers' generate needs equal encoder and decoder stacks."""
  torch_model = _save(variant, tmp_path, num_decoder_layers=2, initializer_factor=3.0)
  model, params = hf.load(str(tmp_path))
  ids, mask = ref.padded_batch(8, 3, 14, 97, right_pad=[(0, 4)], left_pad=[(2, 6)])
  expected = ref.torch_greedy(torch_model, ids, mask, 12, encoder_decoder=True)
  out = generate(model, params, ids, mask, max_new_tokens=12, eos_id=1)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  assert len(np.unique(expected)) > 6  # not one token repeated
