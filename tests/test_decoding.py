"""generate(): greedy parity with transformers, the loop's bookkeeping, samplers, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.decoding import (
  Greedy,
  Sample,
  Temperature,
  TopK,
  TopP,
  chain,
  decode_loop,
  front,
  generate,
)

N = 14


MODELS = {
  # transformers' generate needs equal stacks; a larger init keeps a random T5 from repeating one token.
  "t5": (lambda: ref.t5(num_decoder_layers=2, initializer_factor=3.0), True),
  "t5v1_1": (lambda: ref.t5("t5v1_1", num_decoder_layers=2), True),
  "gpt2": (ref.gpt2, False),
  "qwen2": (ref.qwen2, False),
}


_CACHE = {}


def _load(name, tmp_path_factory):
  if name not in _CACHE:
    make, enc_dec = MODELS[name]
    torch_model = make()
    path = tmp_path_factory.mktemp(name)
    torch_model.save_pretrained(path)
    model, params = hf.load(str(path))
    _CACHE[name] = (torch_model, model, params, enc_dec)
  return _CACHE[name]


@pytest.fixture(scope="module", params=sorted(MODELS))
def loaded(request, tmp_path_factory):
  """Every family: for the parity tests."""
  return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["qwen2"])
def one(request, tmp_path_factory):
  """One family: for tests of model-independent machinery (samplers, hooks, jit cache)."""
  return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def two(request, tmp_path_factory):
  """An encoder-decoder and a decoder-only model."""
  return _load(request.param, tmp_path_factory)


def test_greedy_equals_transformers(loaded):
  torch_model, model, params, enc_dec = loaded
  # Left padding (what transformers wants for decoder-only batches), prompts of 5..12 tokens.
  ids, mask = ref.padded_batch(0, 5, 12, 97, left_pad=[(1, 5), (3, 2), (4, 7)])
  eos = ref.eos_that_ends_some_rows(torch_model, ids, mask, enc_dec, N)
  expected = ref.torch_greedy(torch_model, ids, mask, N, eos, enc_dec)
  out = generate(model, params, ids, mask, max_new_tokens=N, eos_id=eos)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected)
  lengths = np.asarray(out.lengths)
  assert lengths.min() < N and lengths.max() == N  # EOS was really exercised
  for row, n in enumerate(lengths):
    assert (n == N) or expected[row, n - 1] == eos
    assert (np.asarray(out.tokens)[row, n:] == 0).all()


def test_right_padded_prompts_give_the_same_tokens(two):
  _, model, params, _ = two
  ids, mask = ref.padded_batch(1, 3, 10, 97, left_pad=[(0, 3)])
  right_ids = np.zeros_like(ids)
  right_mask = np.zeros_like(mask)
  for r in range(3):
    n = mask[r].sum()
    right_ids[r, :n] = ids[r, mask[r] == 1]
    right_mask[r, :n] = 1
  a = generate(model, params, ids, mask, max_new_tokens=6, eos_id=None)
  b = generate(model, params, right_ids, right_mask, max_new_tokens=6, eos_id=None)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_logprobs_are_the_models(two):
  torch_model, model, params, enc_dec = two
  ids, mask = ref.padded_batch(2, 2, 8, 97)
  out = generate(model, params, ids, mask, max_new_tokens=5, eos_id=None, return_logprobs=True)
  toks = np.asarray(out.tokens)
  if enc_dec:
    dec = np.concatenate([np.zeros((2, 1), np.int64), toks[:, :-1]], 1)
    logits = ref.torch_logits(
      torch_model, input_ids=ids, attention_mask=mask, decoder_input_ids=dec
    )
  else:
    logits = ref.torch_logits(torch_model, input_ids=np.concatenate([ids, toks], 1))[:, 7:-1]
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  expected = np.take_along_axis(logp, toks[..., None], -1)[..., 0]
  # The T5 here has logits in the hundreds (a large init keeps it from repeating one
  # token), so float32 round-off reaches ~1e-4 in absolute terms.
  np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=5e-4)


# --- the loop alone, with a scripted fake model -------------------------------------------


def _scripted(script_BT, vocab=10, runner_up=None):
  """step_fn whose logits at step t put the largest value on script[b, t].

  The carry counts model calls. `runner_up[b, t]` gets the second-largest value.
  """
  script = jnp.asarray(script_BT)
  second = jnp.asarray(runner_up if runner_up is not None else (script_BT + 1) % vocab)

  def logits_at(t):
    b = script.shape[0]
    x = jnp.zeros((b, vocab)).at[jnp.arange(b), second[:, t]].set(5.0)
    return x.at[jnp.arange(b), script[:, t]].set(10.0)

  def step_fn(carry, token_B):
    t, calls = carry
    return logits_at(t + 1), (t + 1, calls + 1)

  return logits_at(0), (jnp.int32(0), jnp.int32(0)), step_fn


EOS, PAD = 1, 0


def _run(script, max_new, min_new=0, stop=(EOS,), runner_up=None):
  first, carry, step_fn = _scripted(np.asarray(script), runner_up=runner_up)
  run = jax.jit(
    lambda f, c: decode_loop(
      step_fn,
      f,
      c,
      jax.random.PRNGKey(0),
      max_new_tokens=max_new,
      sampler=Greedy(),
      stop_ids=stop,
      min_new_tokens=min_new,
      pad_id=PAD,
    )
  )
  s = run(first, carry)
  return np.asarray(s.tokens), np.asarray(s.lengths), int(s.step), int(s.carry[1])


def test_loop_bookkeeping_eos_per_row():
  script = [
    [5, 6, 1, 7, 8, 9, 2, 3],  # EOS at step 2
    [4, 4, 4, 4, 4, 4, 4, 4],  # never
    [1, 9, 9, 9, 9, 9, 9, 9],
  ]  # EOS at step 0
  tokens, lengths, steps, calls = _run(script, max_new=6)
  np.testing.assert_array_equal(
    tokens, [[5, 6, 1, 0, 0, 0], [4, 4, 4, 4, 4, 4], [1, 0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(lengths, [3, 6, 1])
  assert steps == 6 and calls == 6  # the model consumes each chosen token once


def test_loop_stops_when_every_row_is_done():
  script = [[5, 1, 9, 9, 9, 9], [1, 9, 9, 9, 9, 9], [7, 7, 1, 9, 9, 9]]
  tokens, lengths, steps, calls = _run(script, max_new=6)
  np.testing.assert_array_equal(lengths, [2, 1, 3])
  assert steps == 3 and calls == 3  # stopped as soon as the last row ended
  np.testing.assert_array_equal(tokens[:, 3:], 0)


def test_loop_min_new_tokens_and_several_stop_ids():
  script = [[1, 1, 1, 5, 1, 9], [3, 8, 3, 8, 8, 8]]
  runner = [[6, 7, 8, 6, 6, 6], [4, 4, 4, 4, 4, 4]]
  tokens, lengths, _, _ = _run(script, max_new=6, min_new=2, stop=(EOS, 8), runner_up=runner)
  # Row 0: EOS suppressed at steps 0-1 (runner-up instead), allowed at step 2.
  # Row 1: stop id 8 suppressed at step 1, so 4; then 3, then 8 ends it.
  np.testing.assert_array_equal(tokens, [[6, 7, 1, 0, 0, 0], [3, 4, 3, 8, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 4])


def test_loop_max_new_tokens_without_stop():
  tokens, lengths, steps, calls = _run([[2, 3, 4, 5, 6]], max_new=3, stop=())
  np.testing.assert_array_equal(tokens, [[2, 3, 4]])
  assert lengths.tolist() == [3] and steps == 3 and calls == 3


# --- samplers ------------------------------------------------------------------------------


def _random_logits(seed, b=64, v=40):
  return jnp.asarray(np.random.RandomState(seed).randn(b, v).astype(np.float32) * 2)


def test_topk_never_leaves_its_set():
  logits = _random_logits(0)
  allowed = np.argsort(-np.asarray(logits), axis=1)[:, :5]
  for i in range(20):
    tok = np.asarray(TopK(5).sample(jax.random.PRNGKey(i), logits))
    assert all(t in allowed[r] for r, t in enumerate(tok))


def test_topp_never_leaves_its_set():
  logits = np.asarray(_random_logits(1))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  allowed = []
  for row in probs:  # the smallest prefix with mass >= 0.6
    order = np.argsort(-row)
    k = int(np.searchsorted(np.cumsum(row[order]), 0.6) + 1)
    allowed.append(set(order[:k].tolist()))
  seen = set()
  for i in range(20):
    tok = np.asarray(TopP(0.6).sample(jax.random.PRNGKey(i), jnp.asarray(logits)))
    assert all(t in allowed[r] for r, t in enumerate(tok))
    seen |= {(r, t) for r, t in enumerate(tok)}
  assert len(seen) > 64  # it does sample, not just argmax


def test_sampler_distributions_match_numpy():
  logits = np.asarray(_random_logits(2, b=4, v=12))
  lp = np.asarray(chain(Temperature(0.5), TopK(3)).log_probs(jnp.asarray(logits)))
  for r in range(4):
    top = np.argsort(-logits[r])[:3]
    z = logits[r, top] / 0.5
    expected = np.full(12, -np.inf)
    expected[top] = z - np.log(np.exp(z - z.max()).sum()) - z.max()
    np.testing.assert_allclose(lp[r], expected, atol=1e-5)
  g = np.asarray(Greedy().log_probs(jnp.asarray(logits)))
  assert (g.argmax(1) == logits.argmax(1)).all() and np.isinf(g).sum() == 4 * 11


def test_sampling_reproducible_and_key_dependent(one):
  _, model, params, _ = one
  ids, mask = ref.padded_batch(3, 3, 6, 97)
  s = chain(Temperature(1.5), TopP(0.95))
  a = generate(
    model, params, ids, mask, max_new_tokens=8, eos_id=None, sampler=s, rng=jax.random.PRNGKey(7)
  )
  b = generate(
    model, params, ids, mask, max_new_tokens=8, eos_id=None, sampler=s, rng=jax.random.PRNGKey(7)
  )
  c = generate(
    model, params, ids, mask, max_new_tokens=8, eos_id=None, sampler=s, rng=jax.random.PRNGKey(8)
  )
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_temperature_to_zero_is_greedy(one):
  _, model, params, _ = one
  ids, mask = ref.padded_batch(4, 3, 6, 97)
  greedy = generate(model, params, ids, mask, max_new_tokens=8, eos_id=None)
  for t in (0.0, 1e-4):
    cold = generate(
      model,
      params,
      ids,
      mask,
      max_new_tokens=8,
      eos_id=None,
      sampler=Temperature(t),
      rng=jax.random.PRNGKey(3),
    )
    np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(greedy.tokens))


def test_logits_processor_hook(one):
  _, model, params, _ = one
  ids, mask = ref.padded_batch(5, 2, 6, 97)
  plain = np.asarray(generate(model, params, ids, mask, max_new_tokens=6, eos_id=None).tokens)
  banned = int(plain[0, 0])
  ban = lambda logits, state: logits.at[:, banned].set(-jnp.inf)
  out = np.asarray(
    generate(model, params, ids, mask, max_new_tokens=6, eos_id=None, logits_processor=ban).tokens
  )
  assert banned not in out
  force_step = lambda logits, state: jnp.where(state.step == 2, jnp.arange(97)[None] == 11, logits)
  out = np.asarray(
    generate(
      model, params, ids, mask, max_new_tokens=6, eos_id=None, logits_processor=force_step
    ).tokens
  )
  assert (out[:, 2] == 11).all()


# --- compilation, sharding, errors ------------------------------------------------------


def test_one_compilation_per_bucket(one):
  _, model, params, _ = one
  run = lambda ids, mask: generate(
    model, params, ids, mask, max_new_tokens=5, eos_id=None, prompt_buckets=(8, 16)
  )
  ids, mask = ref.padded_batch(6, 2, 7, 97, right_pad=[(1, 3)])
  run(ids, mask)
  before = front.compiled_programs()
  ids2, mask2 = ref.padded_batch(7, 2, 5, 97, left_pad=[(0, 1)])  # other prompts, same bucket
  run(ids2, mask2)
  assert front.compiled_programs() == before
  ids3, mask3 = ref.padded_batch(8, 2, 12, 97)  # next bucket
  run(ids3, mask3)
  assert front.compiled_programs() == before + 1


def _while_body_copies(hlo: str) -> list[str]:
  """Shapes of the `copy` ops in the while-loop bodies of a compiled HLO module."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  assert bodies, "no while loop found in the compiled module"
  copies, current = [], None
  for line in hlo.splitlines():
    head = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
    elif current in bodies:
      copies += re.findall(r"= (\S+) copy\(", line)
  return copies


def test_batch_one_loop_writes_the_cache_in_place(loaded):
  """At batch 1 XLA:CPU copied every cache array four times per step (the scatter indexed
  rows of a [1, K, H, S] array whose unit axis it bitcasts away); the loop body must copy
  no array as large as one layer's cache."""
  _, model, params, _ = loaded
  ids, mask = ref.padded_batch(6, 1, 8, 97)
  hlo = (
    front.lower(
      Sample(Greedy()), model, params, ids, mask, max_new_tokens=8, eos_id=None, prompt_buckets=None
    )
    .compile()
    .as_text()
  )
  cache_len = model.cache_length(ids.shape[1], 8)
  cache = jax.eval_shape(lambda: model.init_cache(1, cache_len))["layers"][0]["v"]
  dims = lambda shape: [int(d) for d in re.findall(r"\d+", shape.split("[")[1].split("]")[0])]
  big = [s for s in _while_body_copies(hlo) if np.prod(dims(s)) >= np.prod(cache.shape)]
  assert big == [], f"the decoding loop copies {big}"


def test_sharded_batch_equals_single_device(two):
  _, model, params, _ = two
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
  ids, mask = ref.padded_batch(9, 6, 9, 97, left_pad=[(2, 3)])  # 6 rows: padded to 8
  single = generate(model, params, ids, mask, max_new_tokens=6, eos_id=None)
  sharded = generate(model, params, ids, mask, max_new_tokens=6, eos_id=None, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
  assert np.asarray(sharded.tokens).shape == (6, 6)


def test_bad_input_is_refused_before_compiling(one, monkeypatch):
  _, model, params, _ = one

  def no_compile(*a, **k):
    raise AssertionError("compiled despite bad input")

  monkeypatch.setattr(front, "_decode_jit", no_compile)
  ids, mask = ref.padded_batch(10, 2, 6, 97)
  cases = [
    (dict(eos_id=97), "outside the vocabulary"),
    (dict(eos_id=-1), "outside the vocabulary"),
    (dict(eos_id=1, sampler=TopP(0.0)), "top-p"),
    (dict(eos_id=1, sampler=TopP(1.5)), "top-p"),
    (dict(eos_id=1, sampler=TopK(0)), "top-k"),
    (dict(eos_id=1, sampler=Temperature(-1.0)), "temperature"),
    (dict(eos_id=1, max_new_tokens=0), "max_new_tokens"),
    (dict(eos_id=1, min_new_tokens=9), "min_new_tokens"),
  ]
  for kwargs, msg in cases:
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=msg):
      generate(model, params, ids, mask, **kwargs)
  with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[1\]"):
    generate(model, params, ids, mask * np.array([[1], [0]]), max_new_tokens=4, eos_id=1)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(model, params, ids + 200, mask, max_new_tokens=4, eos_id=1)


def test_prompt_longer_than_positions_is_refused(tmp_path):
  torch_model = ref.gpt2(n_positions=32)
  torch_model.save_pretrained(tmp_path)
  model, params = hf.load(str(tmp_path))
  ids, mask = ref.padded_batch(11, 1, 30, 97)
  with pytest.raises(ValueError, match="30 tokens \\+ 8 new tokens needs 38 positions.*only 32"):
    generate(model, params, ids, mask, max_new_tokens=8, eos_id=None)
  # A prompt that fits is not refused just because its bucket (32) would not.
  out = generate(model, params, ids[:, :20], mask[:, :20], max_new_tokens=8, eos_id=None)
  assert np.asarray(out.tokens).shape == (1, 8)
