"""The LLM-to-SLM hybrid: guidance really on/off, pooling, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from helpers import LLM_CFG
from l2s_jax import hf
from l2s_jax.decoding import generate
from l2s_jax.models import LLMToSLM, T5, init_params
from l2s_jax.models.hybrid import pool_to_slm


@pytest.fixture(scope="module")
def llm():
  model = T5(LLM_CFG, encoder_only=True)
  return model, init_params(model, jax.random.PRNGKey(1))


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def slm(request, tmp_path_factory):
  torch_model = ref.t5("t5v1_1") if request.param == "t5" else ref.gpt2()
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  model, params = hf.load(str(path))
  return request.param, model, params


def _hybrid(llm, slm, zero):
  llm_model, llm_params = llm
  kind, slm_model, slm_params = slm
  hybrid = LLMToSLM(llm=llm_model, slm=slm_model, zero_init_projector=zero)
  params = dict(init_params(hybrid, jax.random.PRNGKey(2)))
  params["llm"], params["slm"] = llm_params, slm_params  # pretrained parts
  return kind, hybrid, params


def _inputs(kind, seed=0):
  ids, mask = ref.padded_batch(seed, 3, 10, 97, right_pad=[(1, 4)])
  llm_ids, llm_mask = ref.padded_batch(seed + 1, 3, 7, 97, right_pad=[(2, 3)])
  kw = dict(llm_input_ids=llm_ids, llm_attention_mask=llm_mask)
  if kind == "t5":
    kw["decoder_input_ids"] = ref.padded_batch(seed + 2, 3, 6, 97)[0]
  else:
    kw["prompt_mask"] = mask * (np.arange(10) < 6)  # 6 prompt tokens, then the response
  return ids, mask, kw


def _apply(hybrid, params, ids, mask, kw):
  return np.asarray(
    jax.jit(lambda p, a, m, k: hybrid.apply({"params": p}, a, m, **k))(params, ids, mask, kw)
  )


def _plain(kind, slm, ids, mask, kw):
  _, model, params = slm
  if kind == "t5":
    return np.asarray(ref.jitted(model)(params, ids, mask, kw["decoder_input_ids"]))
  return np.asarray(ref.jitted(model)(params, ids, mask))


def test_zero_projector_output_is_exactly_the_slm(llm, slm):
  kind, hybrid, params = _hybrid(llm, slm, zero=True)
  ids, mask, kw = _inputs(kind)
  np.testing.assert_array_equal(
    _apply(hybrid, params, ids, mask, kw), _plain(kind, slm, ids, mask, kw)
  )


def test_projector_changes_the_prompt_and_only_the_prompt(llm, slm):
  kind, hybrid, params = _hybrid(llm, slm, zero=False)
  ids, mask, kw = _inputs(kind)
  guided, plain = _apply(hybrid, params, ids, mask, kw), _plain(kind, slm, ids, mask, kw)
  assert np.abs(guided - plain).max() > 1e-2  # the switch is really on
  if kind == "gpt2":
    # Causal: positions before the first prompt token differ, and a model whose
    # response embeddings are untouched gives the same logits at the response
    # positions only through attention; so check the embeddings directly.
    embeds = jax.jit(
      lambda p: hybrid.apply(
        {"params": p},
        ids,
        mask,
        kw["llm_input_ids"],
        kw["llm_attention_mask"],
        None,
        kw["prompt_mask"],
        method=hybrid.slm_inputs_embeds,
      )
    )(params)
    plain_embeds = ref.jitted(slm[1], "embed")(slm[2], ids)
    diff = np.abs(np.asarray(embeds) - np.asarray(plain_embeds)).max(-1)
    prompt = kw["prompt_mask"].astype(bool)
    assert (diff[~prompt] == 0).all() and (
      diff[prompt & (kw["llm_attention_mask"].sum(1)[:, None] > np.arange(10))] > 0
    ).all()


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_input_embeddings_are_the_papers_formula(llm, slm, mode):
  """E = E_X + Z' ("add") or E = Z' ("replace") at prompt positions, E_X elsewhere, with
  Z' = Linear(ReLU(Linear(H))) of the LLM encoder's states H, computed here in NumPy from
  the params (token i of H feeds prompt token i; masked LLM tokens give 0)."""
  kind, hybrid, params = _hybrid(llm, slm, zero=False)
  hybrid = hybrid.clone(mode=mode)
  ids, mask, kw = _inputs(kind)
  llm_ids, llm_mask = kw["llm_input_ids"], kw["llm_attention_mask"]
  prompt = kw.get("prompt_mask", mask).astype(bool)
  embeds = np.asarray(
    jax.jit(
      lambda p: hybrid.apply(
        {"params": p},
        ids,
        mask,
        llm_ids,
        llm_mask,
        None,
        kw.get("prompt_mask"),
        method=hybrid.slm_inputs_embeds,
      )
    )(params)
  )
  h = np.asarray(ref.jitted(llm[0], "encode")(llm[1], llm_ids, llm_mask), np.float64)
  pj = jax.tree.map(lambda x: np.asarray(x, np.float64), params["projector"])
  z = np.maximum(h @ pj["in"] + pj["in_bias"], 0.0) @ pj["out"] + pj["out_bias"]
  z = z * llm_mask[..., None]
  pooled = np.zeros(ids.shape + (z.shape[-1],))
  m = min(z.shape[1], ids.shape[1])
  pooled[:, :m] = z[:, :m]
  e_x = np.asarray(ref.jitted(slm[1], "embed")(slm[2], ids), np.float64)
  expected = np.where(prompt[..., None], pooled if mode == "replace" else e_x + pooled, e_x)
  np.testing.assert_allclose(embeds, expected, atol=2e-5)
  assert np.abs(pooled[prompt]).max() > 0.1  # Z' is far from zero: the check bites
  assert (llm_mask.sum(1)[:, None] > np.arange(ids.shape[1]))[prompt].any()


def test_overlap_pooling_is_the_mean_of_overlapping_states():
  z = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  llm_mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  overlap = (
    jnp.zeros((2, 3, 4))
    .at[0, 0, 0]
    .set(1)
    .at[0, 0, 1]
    .set(1)
    .at[0, 1, 2]
    .set(1)
    .at[0, 2, 3]
    .set(1)
    .at[1, 2, :]
    .set(1)
  )
  out = np.asarray(pool_to_slm(z, 5, llm_mask, overlap))
  zz = np.asarray(z)
  np.testing.assert_allclose(out[0, 0], (zz[0, 0] + zz[0, 1]) / 2)
  np.testing.assert_allclose(out[0, 1], zz[0, 2])
  np.testing.assert_allclose(out[0, 2], 0)  # overlaps only a padding LLM token
  np.testing.assert_allclose(out[1, 2], zz[1].mean(0))
  np.testing.assert_allclose(out[:, 3:], 0)  # rows past the overlap matrix
  shared = np.asarray(pool_to_slm(z, 6, llm_mask, None))
  np.testing.assert_allclose(shared[0, :3], zz[0, :3])
  np.testing.assert_allclose(shared[0, 3:], 0)


def test_generate_runs_the_hybrid(llm, slm):
  kind, hybrid, params = _hybrid(llm, slm, zero=True)
  ids, mask = ref.padded_batch(5, 3, 8, 97, right_pad=[(0, 3)])
  llm_ids, llm_mask = ref.padded_batch(6, 3, 9, 97)
  extra = dict(llm_input_ids=llm_ids, llm_attention_mask=llm_mask)
  out = generate(hybrid, params, ids, mask, max_new_tokens=6, eos_id=None, extra_inputs=extra)
  plain = generate(slm[1], slm[2], ids, mask, max_new_tokens=6, eos_id=None)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
  guided = LLMToSLM(llm=llm[0], slm=slm[1])
  gp = dict(init_params(guided, jax.random.PRNGKey(9)), llm=llm[1], slm=slm[2])
  out2 = generate(guided, gp, ids, mask, max_new_tokens=6, eos_id=None, extra_inputs=extra)
  assert not np.array_equal(np.asarray(out2.tokens), np.asarray(plain.tokens))
