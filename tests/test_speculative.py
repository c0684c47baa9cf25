"""Speculative decoding: greedy equals the LLM's own greedy output; sampling is lossless."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from helpers import chi_square_pvalue
from l2s_jax import hf
from l2s_jax.collab.speculative import expected_speedup, speculative_generate
from l2s_jax.decoding import Temperature, TopK, chain
from l2s_jax.models import LLMToSLM, init_params

N = 14


def noisy(params, scale, seed):
  """A draft model that agrees with the LLM often, not always: its weights plus noise."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + scale * x.std() * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


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


@pytest.mark.parametrize(
  "gamma,scale",
  [
    pytest.param(1, 0.3, marks=pytest.mark.slow),
    (3, 0.3),
    pytest.param(5, 0.15, marks=pytest.mark.slow),
  ],
)
def test_greedy_equals_llm_greedy(pair, gamma, scale):
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(0, 5, 12, 97, left_pad=[(1, 5), (3, 2), (4, 7)])
  eos = ref.eos_that_ends_some_rows(torch_model, ids, mask, enc_dec, N)
  expected = ref.torch_greedy(torch_model, ids, mask, N, eos, enc_dec)
  draft = noisy(params, scale, seed=gamma)
  out = speculative_generate(
    model, params, model, draft, ids, mask, max_new_tokens=N, gamma=gamma, eos_id=eos
  )
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.lengths.min() < N and out.lengths.max() == N  # EOS ended some rows early
  # The draft really diverged, at different steps in different rows.
  assert 0.0 < out.summary()["draft_acceptance"] < 1.0
  assert len(set((out.stats["accepted"] / np.maximum(out.stats["drafted"], 1)).round(3))) > 1
  assert (out.stats["large_calls"] < out.lengths + 1).all()
  # The per-position profile counts every verify pass: position 1 each time, position i+1
  # only after i was kept; kept drafts and rejections add up to the positions verified.
  np.testing.assert_array_equal(out.stats["reached_at"][:, 0], out.stats["large_calls"] - 1)
  np.testing.assert_array_equal(out.stats["accepted_at"].sum(1), out.stats["accepted"])
  np.testing.assert_array_equal(
    out.stats["reached_at"].sum(1), out.stats["accepted"] + out.stats["rejected"]
  )
  np.testing.assert_array_equal(out.stats["reached_at"][:, 1:], out.stats["accepted_at"][:, :-1])


def test_eos_inside_a_draft_and_full_acceptance(pair):
  """A perfect draft: every draft is kept (bonus tokens), EOS arrives inside drafts."""
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(2, 4, 9, 97, left_pad=[(2, 3)])
  eos = ref.eos_that_ends_some_rows(torch_model, ids, mask, enc_dec, N)
  expected = ref.torch_greedy(torch_model, ids, mask, N, eos, enc_dec)
  out = speculative_generate(
    model, params, model, params, ids, mask, max_new_tokens=N, gamma=4, eos_id=eos
  )
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.summary()["acceptance_rate"] == 1.0
  # Rows that stop early stop in the middle of a 5-token (4 drafts + bonus) block.
  assert any(n % 5 not in (0, 1) for n in out.lengths[out.lengths < N])


def test_adaptive_gamma_keeps_the_output(pair):
  torch_model, model, params, enc_dec = pair
  ids, mask = ref.padded_batch(3, 3, 8, 97)
  expected = ref.torch_greedy(torch_model, ids, mask, N, None, enc_dec)
  out = speculative_generate(
    model, params, model, noisy(params, 0.1, 7), ids, mask, max_new_tokens=N, gamma=6, adaptive=True
  )
  np.testing.assert_array_equal(out.tokens, expected)
  # Each verify pass follows g drafts: a fixed g = 6 drafts 6 per LLM call after the
  # prefill; adaptive g fell after rejections, so fewer were drafted in all.
  fixed = speculative_generate(
    model, params, model, noisy(params, 0.1, 7), ids, mask, max_new_tokens=N, gamma=6
  )
  np.testing.assert_array_equal(fixed.stats["drafted"], 6 * (fixed.stats["large_calls"] - 1))
  assert out.stats["rejected"].sum() > 0
  assert out.stats["drafted"].sum() < 6 * (out.stats["large_calls"] - 1).sum()
  assert (out.stats["drafted"] >= out.stats["large_calls"] - 1).all()  # g never below 1
  # A draft that is the LLM itself is never rejected: g stays at its maximum.
  same = speculative_generate(
    model, params, model, params, ids, mask, max_new_tokens=N, gamma=6, adaptive=True
  )
  assert same.stats["rejected"].sum() == 0
  np.testing.assert_array_equal(same.stats["drafted"], 6 * (same.stats["large_calls"] - 1))


def test_an_llm_to_slm_draft_keeps_the_llm_output(tmp_path):
  """The draft is an LLM-to-SLM hybrid: an SLM reading the LLM's encoder through the
  projector, its prefill fed the prompt's LLM ids as well (slm_extra_inputs)."""
  torch_model = PAIRS["t5"][0]()
  torch_model.save_pretrained(tmp_path)
  llm, llm_params = hf.load(str(tmp_path))
  ids, mask = ref.padded_batch(4, 4, 11, 97, right_pad=[(1, 4), (3, 2)])
  eos = ref.eos_that_ends_some_rows(torch_model, ids, mask, True, N)
  expected = ref.torch_greedy(torch_model, ids, mask, N, eos, True)
  hybrid = LLMToSLM(llm=llm, slm=llm)
  init = init_params(hybrid, jax.random.PRNGKey(5))
  projector = jax.tree.map(lambda x: 0.2 * x, init["projector"])
  params = {"llm": llm_params, "slm": noisy(llm_params, 0.3, 2), "projector": projector}
  extra = {"llm_input_ids": ids, "llm_attention_mask": mask}
  out = speculative_generate(
    llm,
    llm_params,
    hybrid,
    params,
    ids,
    mask,
    max_new_tokens=N,
    gamma=3,
    eos_id=eos,
    slm_extra_inputs=extra,
  )
  np.testing.assert_array_equal(out.tokens, expected)
  assert 0.0 < out.summary()["draft_acceptance"] < 1.0
  # The encoder's states reach the drafts: without them (projector 0) other drafts are kept.
  off = {**params, "projector": jax.tree.map(jnp.zeros_like, projector)}
  plain = speculative_generate(
    llm,
    llm_params,
    hybrid,
    off,
    ids,
    mask,
    max_new_tokens=N,
    gamma=3,
    eos_id=eos,
    slm_extra_inputs=extra,
  )
  np.testing.assert_array_equal(plain.tokens, expected)
  assert not np.array_equal(plain.stats["accepted"], out.stats["accepted"])


# --- lossless speculative sampling -------------------------------------------------------
V = 6


class LyingSampler(Temperature):
  """Draws from temperature 1 but reports temperature 3 as its distribution: a wrong q."""

  def log_probs(self, logits_BV):
    return Temperature(3.0).log_probs(logits_BV)


@pytest.mark.parametrize(
  "sampler,top_k", [(Temperature(1.0), None), (chain(Temperature(0.8), TopK(4)), 4)]
)
def test_speculative_sampling_is_lossless(tiny_pair, sampler, top_k):
  (llm_torch, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  prompt = [2, 3, 4]
  rows = 20000
  ids = np.tile(np.asarray([prompt], np.int32), (rows, 1))
  temperature = sampler.temperature if isinstance(sampler, Temperature) else 0.8
  exact = ref.exact_two_token_distribution(llm_torch, prompt, temperature, top_k)
  out = speculative_generate(
    llm,
    llm_params,
    slm,
    slm_params,
    ids,
    max_new_tokens=3,
    gamma=2,
    sampler=sampler,
    rng=jax.random.PRNGKey(11),
    prompt_buckets=None,
  )
  assert 0.2 < out.summary()["draft_acceptance"] < 0.8  # both branches are exercised
  assert chi_square_pvalue(out.tokens[:, :2], exact) > 1e-3
  tv = (
    0.5
    * np.abs(
      np.histogram2d(out.tokens[:, 0], out.tokens[:, 1], bins=V, range=[[0, V], [0, V]])[0] / rows
      - exact
    ).sum()
  )
  assert tv < 0.02


def test_a_wrong_q_is_detected(tiny_pair):
  """The same test fails when q is not the distribution the drafts were drawn from."""
  (llm_torch, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  prompt = [2, 3, 4]
  ids = np.tile(np.asarray([prompt], np.int32), (20000, 1))
  exact = ref.exact_two_token_distribution(llm_torch, prompt, 1.0)
  out = speculative_generate(
    llm,
    llm_params,
    slm,
    slm_params,
    ids,
    max_new_tokens=3,
    gamma=2,
    sampler=Temperature(1.0),
    draft_sampler=LyingSampler(1.0),
    rng=jax.random.PRNGKey(11),
    prompt_buckets=None,
  )
  assert chi_square_pvalue(out.tokens[:, :2], exact) < 1e-6


# (alpha, gamma, c, speedup) worked out by hand from Leviathan et al. (2023), Thm 3.8: an
# iteration yields 1 + alpha + ... + alpha^gamma tokens on average and costs gamma c + 1 LLM
# steps.
#   0.8, 5, 0.05: 1 + .8 + .64 + .512 + .4096 + .32768 = 3.68928 tokens; / 1.25 = 2.951424
#   0.5, 3, 0.1:  1 + .5 + .25 + .125 = 1.875 tokens; / 1.3 = 1.4423076923...
#   0.6, 2, 0.5:  1 + .6 + .36 = 1.96 tokens; / 2 = 0.98 (a costly draft loses)
#   0.0, 4, 0.2:  1 token (the LLM's own); / 1.8 = 0.5555...
#   1.0, 3, 0.0:  every draft kept: 4 tokens; / 1 = 4
BY_HAND = [
  (0.8, 5, 0.05, 2.951424),
  (0.5, 3, 0.1, 1.875 / 1.3),
  (0.6, 2, 0.5, 0.98),
  (0.0, 4, 0.2, 1 / 1.8),
  (1.0, 3, 0.0, 4.0),
]


def _simulated_tokens_per_iteration(alpha, gamma, n=200_000, seed=0):
  """Tokens one iteration yields when each draft is kept with probability alpha, i.i.d.,
  counted on n simulated iterations: the kept prefix of the gamma drafts, plus the one
  token the LLM adds (its correction, or its next token after a fully kept draft).
  Returns (mean, standard error)."""
  kept = np.random.default_rng(seed).random((n, gamma)) < alpha
  tokens = np.cumprod(kept, axis=1).sum(axis=1) + 1
  return tokens.mean(), tokens.std() / np.sqrt(n)


@pytest.mark.parametrize("alpha,gamma,c,speedup", BY_HAND)
def test_expected_speedup_formula(alpha, gamma, c, speedup):
  assert expected_speedup(alpha, gamma, c) == pytest.approx(speedup, rel=1e-12)
  # The tokens per iteration it assumes are those of a simulated run.
  mean, se = _simulated_tokens_per_iteration(alpha, gamma)
  assert expected_speedup(alpha, gamma, c) * (gamma * c + 1) == pytest.approx(
    mean, abs=5 * se + 1e-12
  )


def test_expected_speedup_negative_controls():
  """A wrong formula (gamma tokens at most, not gamma + 1; or no cost of the drafts) misses
  both the hand-computed value and the simulated count: the checks above can fail."""
  alpha, gamma, c, speedup = BY_HAND[0]
  wrong_tokens = (1 - alpha**gamma) / (1 - alpha)  # off by one in the exponent
  mean, se = _simulated_tokens_per_iteration(alpha, gamma)
  assert abs(wrong_tokens - mean) > 20 * se
  assert wrong_tokens / (gamma * c + 1) != pytest.approx(speedup, rel=1e-3)
  no_draft_cost = (1 - alpha ** (gamma + 1)) / (1 - alpha)
  assert no_draft_cost != pytest.approx(speedup, rel=1e-3)
  assert expected_speedup(alpha, gamma, c) != pytest.approx(
    wrong_tokens / (gamma * c + 1), rel=1e-3
  )


def test_bad_arguments(tiny_pair, tmp_path):
  (_, llm, llm_params, _), (_, slm, slm_params, _) = tiny_pair
  ids = np.asarray([[2, 3]], np.int32)
  with pytest.raises(ValueError, match="gamma"):
    speculative_generate(llm, llm_params, slm, slm_params, ids, max_new_tokens=3, gamma=0)
  other = ref.gpt2(vocab_size=97)
  other.save_pretrained(tmp_path)
  m97, p97 = hf.load(str(tmp_path))
  with pytest.raises(ValueError, match="vocabulary sizes differ.*large: 6.*small: 97"):
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
  eos = ref.eos_that_ends_some_rows(torch_model, ids, mask, enc_dec, N)
  expected = ref.torch_greedy(torch_model, ids, mask, N, eos, enc_dec)
  draft = noisy(params, 0.3, seed=3)
  kw = dict(max_new_tokens=N, gamma=3, eos_id=eos)
  alone = speculative_generate(model, params, model, draft, ids, mask, **kw)
  spread = speculative_generate(model, params, model, draft, ids, mask, mesh=mesh, **kw)
  np.testing.assert_array_equal(spread.tokens, expected)
  np.testing.assert_array_equal(spread.lengths, alone.lengths)
  for field in ("drafted", "accepted", "rejected", "large_calls"):
    np.testing.assert_array_equal(spread.stats[field], alone.stats[field])
  kw = dict(combiner=Router("top1", 0.6), max_new_tokens=N, eos_id=eos)
  alone = collab_generate([model, model], [params, draft], ids, mask, **kw)
  spread = collab_generate([model, model], [params, draft], ids, mask, mesh=mesh, **kw)
  assert spread.tokens.shape == (5, N) and 0.0 < alone.summary()["large_call_rate"] < 1.0
  np.testing.assert_array_equal(spread.tokens, alone.tokens)
  np.testing.assert_array_equal(spread.lengths, alone.lengths)
  for field in ("large_used", "small_choice", "large_choice"):
    np.testing.assert_array_equal(spread.trace[field], alone.trace[field])
