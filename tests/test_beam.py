"""beam_search(): parity with transformers' beam search, greedy at K=1, the loop alone, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.decoding import front
from l2s_jax.decoding.beam import BeamScoring, beam_search, beam_search_loop

N = 10  # max_new_tokens
K = 4  # num_beams

MODELS = {
  # Random ReLU T5s repeat one token so confidently that no EOS id ends any row
  # early under beam search; the gated-GELU v1.1 variant does end some.
  "t5v1_1": (lambda: ref.t5("t5v1_1", num_decoder_layers=2), True),
  "gpt2": (ref.gpt2, False),
  "qwen2": (ref.qwen2, False),
}


def _prompts():
  """5 prompts of 9, 5, 9, 7 and 3 tokens, left-padded as transformers wants them."""
  return ref.padded_batch(0, 5, 9, 97, left_pad=[(1, 4), (3, 2), (4, 6)])


def _hf_search(
  torch_model, ids, mask, eos, enc_dec, num_beams=K, length_penalty=1.0, early_stopping=False
):
  """transformers' generate: tokens [B, N] (0 after EOS), lengths [B], scores [B].

  Scores are `sequences_scores` for beam search; for greedy (num_beams=1),
  the summed log-probs divided by length ** length_penalty.
  """
  with torch.no_grad():
    out = torch_model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=N,
      min_new_tokens=0,
      num_beams=num_beams,
      eos_token_id=eos,
      pad_token_id=0,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      num_return_sequences=1,
      return_dict_in_generate=True,
      output_scores=True,
    )
  gen = out.sequences.numpy()[:, 1 if enc_dec else ids.shape[1] :]
  if num_beams > 1:
    # transformers fills the slots after EOS with EOS (pad_token_id 0 reads as unset),
    # so the lengths come from the beam indices (-1 past each hypothesis' end).
    lengths = (out.beam_indices.numpy() >= 0).sum(1)
    scores = out.sequences_scores.numpy()
  else:
    is_eos = gen == eos
    lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, gen.shape[1])
    logp = torch_model.compute_transition_scores(
      out.sequences, out.scores, normalize_logits=True
    ).numpy()
    valid = np.arange(gen.shape[1])[None, :] < lengths[:, None]
    scores = np.where(valid, logp, 0).sum(1) / lengths.astype(np.float64) ** length_penalty
  tokens = np.zeros((ids.shape[0], N), np.int64)
  for row, n in enumerate(lengths):
    tokens[row, :n] = gen[row, :n]
  return tokens, lengths, scores


def _eos_that_ends_some_rows(model, params, ids, mask, num_beams):
  """The smallest id that, as EOS, ends some rows early but not all.

  Found with our own search (EOS ids are traced: one compilation for the
  scan); the tests then compare that very search with transformers.
  """
  for eos in range(2, 97):
    out = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=num_beams, eos_id=eos)
    lengths = np.asarray(out.lengths)
    if lengths.min() < N and lengths.max() == N:
      return eos
  raise AssertionError("no id ends some rows early")


@pytest.fixture(scope="module")
def load(tmp_path_factory):
  """load(name) -> (torch_model, model, params, enc_dec, eos), built once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      make, enc_dec = MODELS[name]
      torch_model = make()
      path = tmp_path_factory.mktemp(name)
      torch_model.save_pretrained(path)
      model, params = hf.load(str(path))
      ids, mask = _prompts()
      eos = _eos_that_ends_some_rows(model, params, ids, mask, K)
      cache[name] = (torch_model, model, params, enc_dec, eos)
    return cache[name]

  return get


def _check_equal(ours, expected, pad_id=0):
  tokens, lengths, scores = expected
  np.testing.assert_array_equal(np.asarray(ours.lengths), lengths)
  np.testing.assert_array_equal(np.asarray(ours.tokens), tokens)
  np.testing.assert_allclose(np.asarray(ours.scores), scores, atol=1e-4, rtol=0)
  for row, n in enumerate(lengths):
    assert (np.asarray(ours.tokens)[row, n:] == pad_id).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_beam_search_equals_transformers(load, name):
  torch_model, model, params, enc_dec, eos = load(name)
  ids, mask = _prompts()
  expected = _hf_search(torch_model, ids, mask, eos, enc_dec)
  ours = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=K, eos_id=eos)
  _check_equal(ours, expected)
  lengths = np.asarray(ours.lengths)
  assert lengths.min() < N and lengths.max() == N  # EOS really ended some rows
  tokens = np.asarray(ours.tokens)
  assert (tokens[lengths < N, lengths[lengths < N] - 1] == eos).all()
  greedy = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=1, eos_id=eos)
  assert not np.array_equal(np.asarray(greedy.tokens), tokens)  # the beams really mattered


@pytest.mark.parametrize("name", sorted(MODELS))
def test_right_padded_prompts_give_the_same_search(load, name):
  _, model, params, _, eos = load(name)
  ids, mask = _prompts()
  right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
  for r in range(ids.shape[0]):
    n = mask[r].sum()
    right_ids[r, :n] = ids[r, mask[r] == 1]
    right_mask[r, :n] = 1
  a = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=K, eos_id=eos)
  b = beam_search(model, params, right_ids, right_mask, max_new_tokens=N, num_beams=K, eos_id=eos)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_beam_is_greedy(load, name):
  torch_model, model, params, enc_dec, _ = load(name)
  ids, mask = _prompts()
  eos = _eos_that_ends_some_rows(model, params, ids, mask, 1)
  expected = _hf_search(torch_model, ids, mask, eos, enc_dec, num_beams=1)
  ours = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=1, eos_id=eos)
  _check_equal(ours, expected)
  assert np.asarray(ours.lengths).min() < N


@pytest.mark.parametrize("name", ["gpt2", "t5v1_1"])
@pytest.mark.parametrize(
  "length_penalty,early_stopping",
  [(2.0, True), (-1.0, False), (0.5, "never"), (-0.5, "never"), (1.0, True)],
)
def test_length_penalty_and_early_stopping_equal_transformers(
  load, name, length_penalty, early_stopping
):
  torch_model, model, params, enc_dec, eos = load(name)
  ids, mask = _prompts()
  kw = dict(length_penalty=length_penalty, early_stopping=early_stopping)
  expected = _hf_search(torch_model, ids, mask, eos, enc_dec, **kw)
  ours = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=K, eos_id=eos, **kw)
  _check_equal(ours, expected)
  if length_penalty != 1.0:
    default = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=K, eos_id=eos)
    assert not np.allclose(np.asarray(ours.scores), np.asarray(default.scores))  # really applied


def test_several_eos_ids_equal_transformers(load):
  torch_model, model, params, enc_dec, eos = load("gpt2")
  ids, mask = _prompts()
  eos_ids = [2, eos]  # 3 * K candidates per step instead of 2 * K
  expected = _hf_search(torch_model, ids, mask, eos_ids, enc_dec)
  ours = beam_search(model, params, ids, mask, max_new_tokens=N, num_beams=K, eos_id=eos_ids)
  _check_equal(ours, expected)
  assert np.asarray(ours.lengths).min() < N


# --- the loop alone, with bigram fake models ----------------------------------------------

PAD, EOS, A, B, C = range(5)


def _bigram(p_next_given_prev):
  """log P(next | previous) [5, 5]; a row per previous token, PAD is the start."""
  p = np.asarray(p_next_given_prev, np.float64)
  return np.log(p / p.sum(1, keepdims=True)).astype(np.float32)


# From the start A is likelier than B, but B is almost surely followed by EOS.
_GREEDY_TRAP = _bigram(
  [
    [1e-9, 1e-6, 0.50, 0.40, 0.10],  # after the start token
    [1e-9, 0.25, 0.25, 0.25, 0.25],  # after EOS (never used)
    [1e-9, 0.30, 0.26, 0.24, 0.20],  # after A
    [1e-9, 0.90, 0.04, 0.03, 0.03],  # after B
    [1e-9, 0.21, 0.26, 0.27, 0.26],  # after C
  ]
)
# EOS right away is likeliest; then A A (running) just beats B EOS (finished).
_EARLY_EOS = _bigram(
  [
    [1e-9, 0.45, 0.35, 0.19, 0.01],
    [1e-9, 0.25, 0.25, 0.25, 0.25],
    [1e-9, 0.10, 0.50, 0.22, 0.18],
    [1e-9, 0.90, 0.04, 0.035, 0.025],
    [1e-9, 0.21, 0.29, 0.31, 0.19],
  ]
)


def _bigram_search(logp, num_beams, length_penalty=1.0, early_stopping=False, max_new=5, rows=2):
  """Beam search over a bigram model; the carry is (last token, model calls) per beam."""
  table = jnp.asarray(logp)
  bk = rows * num_beams

  def step_fn(carry, tokens):
    _, calls = carry
    return table[tokens], (tokens, calls + 1)

  first = jnp.broadcast_to(table[PAD], (bk, 5))
  carry = (jnp.zeros((bk,), jnp.int32), jnp.zeros((bk,), jnp.int32))
  scoring = BeamScoring.create(max_new, length_penalty, early_stopping)
  run = jax.jit(
    lambda f, c, s: beam_search_loop(
      step_fn,
      f,
      c,
      num_beams=num_beams,
      max_new_tokens=max_new,
      eos_ids_E=[EOS],
      scoring=s,
      pad_id=PAD,
    )
  )
  return run(first, carry, scoring)


def test_loop_finds_the_better_hypothesis_greedy_misses():
  lp = _GREEDY_TRAP.astype(np.float64)
  b_eos, a_eos = (lp[PAD, B] + lp[B, EOS]) / 2, (lp[PAD, A] + lp[A, EOS]) / 2
  s = _bigram_search(_GREEDY_TRAP, num_beams=2)
  np.testing.assert_array_equal(np.asarray(s.finished_tokens[:, 0]), [[B, EOS, PAD, PAD, PAD]] * 2)
  np.testing.assert_array_equal(np.asarray(s.finished_lengths[:, 0]), [2, 2])
  # Both slots hold finished hypotheses, best first.
  np.testing.assert_allclose(np.asarray(s.finished_scores), [[b_eos, a_eos]] * 2, rtol=1e-6)
  # After step 1 the best running beam (A A, -2.04 / 2) cannot beat the worst
  # finished one (-0.95): the search stops at step 2 of 5, having run the model once.
  assert int(s.step) == 2 and not bool(s.alive)
  np.testing.assert_array_equal(np.asarray(s.carry[1]), 1)

  g = _bigram_search(_GREEDY_TRAP, num_beams=1)
  np.testing.assert_array_equal(np.asarray(g.finished_tokens[:, 0]), [[A, EOS, PAD, PAD, PAD]] * 2)
  np.testing.assert_allclose(np.asarray(g.finished_scores[:, 0]), [a_eos] * 2, rtol=1e-6)


def test_loop_early_stopping_true_ends_when_every_slot_is_full():
  # Step 0 finishes "EOS" (-0.80 / 1); step 1 finishes "B EOS" (-1.77 / 2**3) while
  # "A A" (-1.74 / 2**3) runs on. Both slots are full, but the running beam could
  # still beat the worst finished hypothesis: only early_stopping=True stops here.
  lp = _EARLY_EOS.astype(np.float64)
  full = _bigram_search(_EARLY_EOS, num_beams=2, length_penalty=3.0, early_stopping=True)
  assert int(full.step) == 2
  np.testing.assert_array_equal(np.asarray(full.finished_tokens[0, :, :2]), [[B, EOS], [EOS, PAD]])
  np.testing.assert_allclose(
    np.asarray(full.finished_scores[0]), [(lp[PAD, B] + lp[B, EOS]) / 8, lp[PAD, EOS]], rtol=1e-6
  )
  go_on = _bigram_search(_EARLY_EOS, num_beams=2, length_penalty=3.0, early_stopping=False)
  assert int(go_on.step) > 2
  assert float(go_on.finished_scores[0, 0]) > float(full.finished_scores[0, 0])


def test_loop_runs_to_the_end_with_never():
  # A positive length penalty favours long hypotheses and "never" bounds the
  # running beams at full length: the search goes on to the last token.
  s = _bigram_search(
    _GREEDY_TRAP, num_beams=2, length_penalty=3.0, early_stopping="never", max_new=4
  )
  assert int(s.step) == 4 and int(s.finished_lengths[0, 0]) == 4
  np.testing.assert_array_equal(np.asarray(s.carry[1]), 3)  # no model call after the last token


# --- compilation and errors -----------------------------------------------------------------


def test_one_compilation_per_bucket(load):
  _, model, params, _, eos = load("gpt2")
  run = lambda ids, mask, **kw: beam_search(
    model, params, ids, mask, max_new_tokens=N, num_beams=K, prompt_buckets=(8, 16), **kw
  )
  ids, mask = ref.padded_batch(6, 5, 7, 97, right_pad=[(1, 3)])
  run(ids, mask, eos_id=eos)
  before = front.compiled_programs()
  ids2, mask2 = ref.padded_batch(7, 5, 5, 97, left_pad=[(0, 1)])  # other prompts, same bucket
  run(ids2, mask2, eos_id=eos)
  run(ids2, mask2, eos_id=eos + 1, pad_id=3, length_penalty=0.3, early_stopping="never")
  run(ids2, mask2, eos_id=eos, early_stopping=True)
  assert front.compiled_programs() == before
  ids3, mask3 = ref.padded_batch(8, 5, 20, 97)  # bucket 32
  run(ids3, mask3, eos_id=eos)
  assert front.compiled_programs() == before + 1


def test_bad_arguments_are_refused_before_compiling(load, monkeypatch):
  _, model, params, _, _ = load("gpt2")

  def no_compile(*a, **k):
    raise AssertionError("compiled despite bad arguments")

  monkeypatch.setattr(front, "_decode_jit", no_compile)
  ids, mask = ref.padded_batch(10, 2, 6, 97)
  cases = [
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_id=97), r"eos_id 97 is outside the vocabulary \[0, 97\)"),
    (dict(eos_id=-1), "outside the vocabulary"),
    (dict(eos_id=[1, 200]), "eos_id 200"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(early_stopping="always"), "early_stopping"),
    (dict(pad_id=1.5), "pad_id"),
  ]
  for kwargs, msg in cases:
    args = dict(max_new_tokens=4, num_beams=2, eos_id=1) | kwargs
    with pytest.raises(ValueError, match=msg):
      beam_search(model, params, ids, mask, **args)
  with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[1\]"):
    beam_search(
      model, params, ids, mask * np.array([[1], [0]]), max_new_tokens=4, num_beams=2, eos_id=1
    )
  with pytest.raises(
    ValueError,
    match="prompt of 6 tokens \\+ 63 new tokens needs 69 positions, but the model has only 64",
  ):
    beam_search(model, params, ids, mask, max_new_tokens=63, num_beams=2, eos_id=1)
