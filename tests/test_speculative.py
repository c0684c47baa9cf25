"""Speculative decoding: greedy equals the LLM's own greedy output; sampling is lossless."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.collab.speculative import expected_speedup, speculative_generate
from l2s_jax.decoding import Temperature, TopK, chain
from l2s_jax.models import LLMToSLM, init_params
from test_decoding import _eos_that_ends_some_rows, _hf_generate

N = 14


def noisy(params, scale, seed):
  """A draft model that agrees with the LLM often, not always: its weights plus noise."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * x.std() * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


PAIRS = {
    "gpt2": (ref.gpt2, False),
    "qwen2": (ref.qwen2, False),
    "t5": (lambda: ref.t5(num_decoder_layers=2, initializer_factor=3.0), True),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def pair(request, tmp_path_factory):
  make, enc_dec = PAIRS[request.param]
  torch_model = make()
  path = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(path)
  model, params = hf.load(str(path))
  return torch_model, model, params, enc_dec


@pytest.mark.parametrize("gamma,scale", [pytest.param(1, 0.3, marks=pytest.mark.slow), (3, 0.3),
                                         pytest.param(5, 0.15, marks=pytest.mark.slow)])
def test_greedy_equals_llm_greedy(pair, gamma, scale):
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(0, 5, 12, 97, left_pad=[(1, 5), (3, 2), (4, 7)])
  eos = _eos_that_ends_some_rows(torch_model, ids, mask, enc_dec)
  expected = _hf_generate(torch_model, ids, mask, eos, encoder_decoder=enc_dec)
  draft = noisy(params, scale, seed=gamma)
  out = speculative_generate(model, params, model, draft, ids, mask, max_new_tokens=N,
                             gamma=gamma, eos_id=eos)
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.lengths.min() < N and out.lengths.max() == N      # EOS ended some rows early
  # The draft really diverged, at different steps in different rows.
  assert 0.0 < out.draft_acceptance < 1.0
  assert len(set((out.accepted / np.maximum(out.drafted, 1)).round(3))) > 1
  assert (out.llm_calls < out.lengths + 1).all()
  # The per-position profile counts every verify pass: position 1 each time, position i+1
  # only after i was kept; kept drafts and rejections add up to the positions verified.
  np.testing.assert_array_equal(out.reached_at[:, 0], out.llm_calls - 1)
  np.testing.assert_array_equal(out.accepted_at.sum(1), out.accepted)
  np.testing.assert_array_equal(out.reached_at.sum(1), out.accepted + out.rejected)
  np.testing.assert_array_equal(out.reached_at[:, 1:], out.accepted_at[:, :-1])


def test_eos_inside_a_draft_and_full_acceptance(pair):
  """A perfect draft: every draft is kept (bonus tokens), EOS arrives inside drafts."""
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(2, 4, 9, 97, left_pad=[(2, 3)])
  eos = _eos_that_ends_some_rows(torch_model, ids, mask, enc_dec)
  expected = _hf_generate(torch_model, ids, mask, eos, encoder_decoder=enc_dec)
  out = speculative_generate(model, params, model, params, ids, mask, max_new_tokens=N,
                             gamma=4, eos_id=eos)
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.acceptance_rate == 1.0
  # Rows that stop early stop in the middle of a 5-token (4 drafts + bonus) block.
  assert any(n % 5 not in (0, 1) for n in out.lengths[out.lengths < N])


def test_adaptive_gamma_keeps_the_output(pair):
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(3, 3, 8, 97)
  expected = _hf_generate(torch_model, ids, mask, None, encoder_decoder=enc_dec)
  out = speculative_generate(model, params, model, noisy(params, 0.1, 7), ids, mask,
                             max_new_tokens=N, gamma=6, adaptive=True)
  np.testing.assert_array_equal(out.tokens, expected)
  # Each verify pass follows g drafts: a fixed g = 6 drafts 6 per LLM call after the
  # prefill; adaptive g fell after rejections, so fewer were drafted in all.
  fixed = speculative_generate(model, params, model, noisy(params, 0.1, 7), ids, mask,
                               max_new_tokens=N, gamma=6)
  np.testing.assert_array_equal(fixed.drafted, 6 * (fixed.llm_calls - 1))
  assert out.rejected.sum() > 0
  assert out.drafted.sum() < 6 * (out.llm_calls - 1).sum()
  assert (out.drafted >= out.llm_calls - 1).all()          # g never below 1
  # A draft that is the LLM itself is never rejected: g stays at its maximum.
  same = speculative_generate(model, params, model, params, ids, mask, max_new_tokens=N,
                              gamma=6, adaptive=True)
  assert same.rejected.sum() == 0
  np.testing.assert_array_equal(same.drafted, 6 * (same.llm_calls - 1))


def test_an_llm_to_slm_draft_keeps_the_llm_output(tmp_path):
  """The draft is an LLM-to-SLM hybrid: an SLM reading the LLM's encoder through the
  projector, its prefill fed the prompt's LLM ids as well (slm_extra_inputs)."""
  torch_model = PAIRS["t5"][0]()
  torch_model.save_pretrained(tmp_path)
  llm, llm_params = hf.load(str(tmp_path))
  ids, mask = ref.padded_batch(4, 4, 11, 97, right_pad=[(1, 4), (3, 2)])
  eos = _eos_that_ends_some_rows(torch_model, ids, mask, True)
  expected = _hf_generate(torch_model, ids, mask, eos, encoder_decoder=True)
  hybrid = LLMToSLM(llm=llm, slm=llm)
  init = init_params(hybrid, jax.random.PRNGKey(5))
  projector = jax.tree.map(lambda x: 0.2 * x, init["projector"])
  params = {"llm": llm_params, "slm": noisy(llm_params, 0.3, 2), "projector": projector}
  extra = {"llm_input_ids": ids, "llm_attention_mask": mask}
  out = speculative_generate(llm, llm_params, hybrid, params, ids, mask, max_new_tokens=N,
                             gamma=3, eos_id=eos, slm_extra_inputs=extra)
  np.testing.assert_array_equal(out.tokens, expected)
  assert 0.0 < out.draft_acceptance < 1.0
  # The encoder's states reach the drafts: without them (projector 0) other drafts are kept.
  off = {**params, "projector": jax.tree.map(jnp.zeros_like, projector)}
  plain = speculative_generate(llm, llm_params, hybrid, off, ids, mask, max_new_tokens=N,
                               gamma=3, eos_id=eos, slm_extra_inputs=extra)
  np.testing.assert_array_equal(plain.tokens, expected)
  assert not np.array_equal(plain.accepted, out.accepted)


# --- lossless speculative sampling -------------------------------------------------------
V = 6


def _exact_two_token_distribution(torch_model, prompt, temperature, top_k=None):
  """P(x1, x2 | prompt) of the LLM's own sampling, from full forwards: [V, V]."""
  def dist(seq):
    z = ref.torch_logits(torch_model, input_ids=np.asarray([seq]))[0, -1] / temperature
    if top_k is not None:
      z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    e = np.exp(z - z.max())
    return e / e.sum()
  p1 = dist(prompt)
  return np.stack([p1[a] * dist(prompt + [a]) for a in range(V)])


class LyingSampler(Temperature):
  """Draws from temperature 1 but reports temperature 3 as its distribution: a wrong q."""

  def log_probs(self, logits_BV):
    return Temperature(3.0).log_probs(logits_BV)


def _chi_square_pvalue(tokens, expected_p):
  """Chi-square goodness of fit of the (x1, x2) counts; cells expected < 5 are pooled."""
  counts = np.zeros((V, V))
  np.add.at(counts, (tokens[:, 0], tokens[:, 1]), 1)
  expected = expected_p.astype(np.float64).ravel() * len(tokens)
  counts = counts.ravel()
  if counts[expected == 0].sum() > 0:
    return 0.0                                   # a token the LLM can never produce
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  exp = exp[keep] * obs[keep].sum() / exp[keep].sum()
  return scipy.stats.chisquare(obs[keep], exp).pvalue


@pytest.mark.parametrize("sampler,top_k", [(Temperature(1.0), None),
                                           (chain(Temperature(0.8), TopK(4)), 4)])
def test_speculative_sampling_is_lossless(tiny_pair, sampler, top_k):
  (llm_torch, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  prompt = [2, 3, 4]
  rows = 20000
  ids = np.tile(np.asarray([prompt], np.int32), (rows, 1))
  temperature = sampler.temperature if isinstance(sampler, Temperature) else 0.8
  exact = _exact_two_token_distribution(llm_torch, prompt, temperature, top_k)
  out = speculative_generate(llm, llm_params, slm, slm_params, ids, max_new_tokens=3, gamma=2,
                             sampler=sampler, rng=jax.random.PRNGKey(11), prompt_buckets=None)
  assert 0.2 < out.draft_acceptance < 0.8                       # both branches are exercised
  assert _chi_square_pvalue(out.tokens[:, :2], exact) > 1e-3
  tv = 0.5 * np.abs(np.histogram2d(out.tokens[:, 0], out.tokens[:, 1], bins=V,
                                   range=[[0, V], [0, V]])[0] / rows - exact).sum()
  assert tv < 0.02


def test_a_wrong_q_is_detected(tiny_pair):
  """The same test fails when q is not the distribution the drafts were drawn from."""
  (llm_torch, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  prompt = [2, 3, 4]
  ids = np.tile(np.asarray([prompt], np.int32), (20000, 1))
  exact = _exact_two_token_distribution(llm_torch, prompt, 1.0)
  out = speculative_generate(llm, llm_params, slm, slm_params, ids, max_new_tokens=3, gamma=2,
                             sampler=Temperature(1.0), draft_sampler=LyingSampler(1.0),
                             rng=jax.random.PRNGKey(11), prompt_buckets=None)
  assert _chi_square_pvalue(out.tokens[:, :2], exact) < 1e-6


def test_expected_speedup_formula():
  # Leviathan et al. (2023): alpha 0.8, gamma 5, c 0.05 -> (1 - 0.8^6) / (0.2 * 1.25)
  assert expected_speedup(0.8, 5, 0.05) == pytest.approx((1 - 0.8 ** 6) / (0.2 * 1.25))
  assert expected_speedup(1.0, 3, 0.0) == 4.0


def test_bad_arguments(tiny_pair, tmp_path):
  (_, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  ids = np.asarray([[2, 3]], np.int32)
  with pytest.raises(ValueError, match="gamma"):
    speculative_generate(llm, llm_params, slm, slm_params, ids, max_new_tokens=3, gamma=0)
  other = ref.gpt2(vocab_size=97)
  other.save_pretrained(tmp_path)
  m97, p97 = hf.load(str(tmp_path))
  with pytest.raises(ValueError, match="vocabulary sizes differ.*LLM: 6.*SLM: 97"):
    speculative_generate(llm, llm_params, m97, p97, ids, max_new_tokens=3)


def test_collaborative_decoders_take_a_mesh(tmp_path):
  """speculative_generate and collab_generate split the batch over a mesh's data axes (5 rows
  padded to 8 for data 2 x fsdp 2) and give what they give on one device, row by row (one
  pair, T5: the batch handling does not depend on the model)."""
  from l2s_jax import sharding
  from l2s_jax.collab.combine import Router, collab_generate
  make, enc_dec = PAIRS["t5"]
  torch_model = make()
  torch_model.save_pretrained(tmp_path)
  model, params = hf.load(str(tmp_path))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ids, mask = ref.padded_batch(0, 5, 12, 97, left_pad=[(1, 5), (3, 2)])
  eos = _eos_that_ends_some_rows(torch_model, ids, mask, enc_dec)
  expected = _hf_generate(torch_model, ids, mask, eos, encoder_decoder=enc_dec)
  draft = noisy(params, 0.3, seed=3)
  kw = dict(max_new_tokens=N, gamma=3, eos_id=eos)
  alone = speculative_generate(model, params, model, draft, ids, mask, **kw)
  spread = speculative_generate(model, params, model, draft, ids, mask, mesh=mesh, **kw)
  np.testing.assert_array_equal(spread.tokens, expected)
  for field in ("lengths", "drafted", "accepted", "rejected", "llm_calls"):
    np.testing.assert_array_equal(getattr(spread, field), getattr(alone, field))
  kw = dict(combiner=Router("top1", 0.6), max_new_tokens=N, eos_id=eos)
  alone = collab_generate([model, model], [params, draft], ids, mask, **kw)
  spread = collab_generate([model, model], [params, draft], ids, mask, mesh=mesh, **kw)
  assert spread.tokens.shape == (5, N) and 0.0 < alone.call_rate < 1.0
  for field in ("tokens", "lengths", "llm_used", "slm_choice", "llm_choice"):
    np.testing.assert_array_equal(getattr(spread, field), getattr(alone, field))
