"""Routed decoding that runs the LLM only where the router fires (l2s_jax/collab/routed.py),
token for token against transformers' models on small random pairs (GPT-2, Qwen2, T5)."""

import jax
import numpy as np
import pytest
import torch

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.collab import svm_router
from l2s_jax.collab.combine import Router
from l2s_jax.collab.routed import catch_up, routed_generate

N = 10
VOCAB = 97

PAIRS = {
  "gpt2": (ref.gpt2, False),
  "qwen2": (ref.qwen2, False),
  "t5": (lambda seed=0: ref.t5(seed=seed, num_decoder_layers=2, initializer_factor=3.0), True),
}


# Qwen2 (a Llama-family model, as GPT-2 is the other decoder-only family) runs with -m slow.
@pytest.fixture(
  scope="module",
  params=[pytest.param(k, marks=pytest.mark.slow) if k == "qwen2" else k for k in sorted(PAIRS)],
)
def pair(request, tmp_path_factory):
  """(LLM, SLM) of one family: two random models of one vocabulary, torch and ours."""
  make, enc_dec = PAIRS[request.param]
  out = []
  for seed in (0, 1):
    torch_model = make(seed=seed)
    path = tmp_path_factory.mktemp(f"{request.param}_{seed}")
    torch_model.save_pretrained(path)
    out.append((torch_model, *hf.load(str(path))))
  return out, enc_dec


def _prompts():
  return ref.padded_batch(0, 4, 9, VOCAB, left_pad=[(1, 3), (3, 5)])


def _next_logp(torch_model, prompt, generated, enc_dec):
  """log p(next | prompt, generated) by one full forward of transformers' model."""
  with torch.no_grad():
    if enc_dec:
      dec = torch.tensor([[0] + list(generated)])
      logits = torch_model(input_ids=torch.tensor([prompt]), decoder_input_ids=dec).logits
    else:
      logits = torch_model(input_ids=torch.tensor([list(prompt) + list(generated)])).logits
  return torch.log_softmax(logits[0, -1].double(), -1).numpy()


def _reference(pair, ids, mask, eos, decide):
  """Routed greedy decoding row by row with full forwards: decide(slm_logp) -> call the LLM."""
  ((llm_t, *_), (slm_t, *_)), enc_dec = pair
  tokens, used = [], []
  for row in range(ids.shape[0]):
    prompt = [int(x) for x, m in zip(ids[row], mask[row]) if m]
    out, fired = [], []
    for _ in range(N):
      lp_s = _next_logp(slm_t, prompt, out, enc_dec)
      fire = bool(decide(lp_s))
      lp = _next_logp(llm_t, prompt, out, enc_dec) if fire else lp_s
      out.append(int(np.argmax(lp)))
      fired.append(fire)
      if out[-1] == eos:
        break
    tokens.append(out + [0] * (N - len(out)))
    used.append(fired + [False] * (N - len(fired)))
  return np.array(tokens), np.array(used)


def _models(pair):
  ((_, llm, llm_p), (_, slm, slm_p)), _ = pair
  return [llm, slm], [llm_p, slm_p]


def _run(pair, router, eos, chunk=3):
  ids, mask = _prompts()
  return routed_generate(
    *_models(pair), ids, mask, router=router, max_new_tokens=N, eos_id=eos, chunk=chunk
  )


def test_always_gives_the_llms_greedy_output_and_never_the_slms(pair):
  ((llm_t, *_), (slm_t, *_)), enc_dec = pair
  ids, mask = _prompts()
  eos = ref.eos_that_ends_some_rows(llm_t, ids, mask, enc_dec)
  always = _run(pair, Router("always"), eos)
  np.testing.assert_array_equal(always.tokens, ref.torch_greedy(llm_t, ids, mask, N, eos, enc_dec))
  assert always.summary()["large_call_rate"] == 1.0
  never = _run(pair, Router("never"), eos)
  np.testing.assert_array_equal(never.tokens, ref.torch_greedy(slm_t, ids, mask, N, eos, enc_dec))
  assert (
    never.summary()["large_call_rate"] == 0.0
    and not never.trace["batch_calls"].any()
    and never.batch_stats["large_tokens_read"] == 0
  )


def test_a_threshold_router_follows_the_step_by_step_reference(pair):
  """top1 at a threshold that fires on some steps: the tokens, the per-row decisions and the
  per-batch calls equal a row-by-row reference; the LLM reads only what it was owed."""
  ((llm_t, *_), (slm_t, *_)), enc_dec = pair
  ids, mask = _prompts()
  eos = ref.eos_that_ends_some_rows(llm_t, ids, mask, enc_dec)
  never = _run(pair, Router("never"), eos)
  # Quantiles of the SLM's top-1 probability on its own run.
  probs = [
    np.exp(
      _next_logp(
        slm_t, [int(x) for x, m in zip(ids[r], mask[r]) if m], list(never.tokens[r, :t]), enc_dec
      ).max()
    )
    for r in range(ids.shape[0])
    for t in range(int(never.lengths[r]))
  ]
  for q in (50, 30, 15, 5):  # the first threshold that mixes the two
    threshold = float(np.percentile(probs, q))
    out = _run(pair, Router("top1", threshold), eos, chunk=2)
    if 0.0 < out.summary()["large_call_rate"] < 1.0:
      break
  assert 0.0 < out.summary()["large_call_rate"] < 1.0
  tokens, used = _reference(pair, ids, mask, eos, lambda lp: np.exp(lp.max()) < threshold)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.trace["large_used"], used)
  steps = int(out.lengths.max())
  np.testing.assert_array_equal(out.trace["batch_calls"][:steps], used.any(axis=0)[:steps])
  assert out.summary()["batch_call_rate"] >= out.summary()["large_call_rate"]
  # A call before token t makes every row read what it chose since the previous call, so by
  # the last call at step t the LLM has read t tokens per row, and nothing else.
  calls = np.flatnonzero(out.trace["batch_calls"][1:steps]) + 1
  assert out.batch_stats["large_tokens_read"] == ids.shape[0] * (calls.max() if calls.size else 0)
  # Alone, a row calls the LLM only at its own decisions and reads less than one per step.
  one = routed_generate(
    *_models(pair),
    ids[:1],
    mask[:1],
    router=Router("top1", threshold),
    max_new_tokens=N,
    eos_id=eos,
    chunk=2,
  )
  np.testing.assert_array_equal(one.tokens[0], tokens[0])
  np.testing.assert_array_equal(
    one.trace["batch_calls"][: int(one.lengths[0])], used[0, : int(one.lengths[0])]
  )


def test_after_skipped_steps_the_llm_equals_its_full_forward(pair):
  """catch_up with rows owing 5, 0, 2 and 7 tokens (chunks of 3): the LLM's next-token
  log-probs equal transformers' full forward over prompt + owed tokens (1e-4)."""
  ((llm_t, llm, params), _), enc_dec = pair
  ids, mask = ref.padded_batch(1, 4, 6, VOCAB, right_pad=[(1, 2), (3, 1)])
  owed = [5, 0, 2, 7]
  rng = np.random.RandomState(3)
  pending = rng.randint(2, VOCAB, (4, 8)).astype(np.int32)

  @jax.jit
  def run(params, ids, mask, pending, n_pending):
    first, cache = llm.apply({"params": params}, ids, mask, max_len=6 + 8 + 3, method=llm.prefill)
    logp = jax.nn.log_softmax(first, axis=-1)
    return catch_up(llm, params, cache, pending, n_pending, logp, chunk=3, vocab=VOCAB)[1]

  got = np.asarray(run(params, ids, mask, pending, np.array(owed, np.int32)))
  for row, n in enumerate(owed):
    prompt = [int(x) for x, m in zip(ids[row], mask[row]) if m]
    want = _next_logp(llm_t, prompt, list(pending[row, :n]), enc_dec)
    np.testing.assert_allclose(got[row], want, atol=1e-4, rtol=1e-5)  # log-probs down to -46


def test_the_svm_router_in_the_loop_decides_as_sklearn(pair):
  """FS-GEN's SVM router, fitted with scikit-learn on the SLM's top-k probabilities: inside the
  compiled loop it fires exactly where sklearn's `predict` says, step by step."""
  from sklearn.svm import SVC

  ((llm_t, *_), (slm_t, *_)), enc_dec = pair
  ids, mask = _prompts()
  eos = ref.eos_that_ends_some_rows(llm_t, ids, mask, enc_dec)
  oracle = _run(pair, Router("always"), eos)
  k = 4
  feats, labels = [], []
  for r in range(ids.shape[0]):
    prompt = [int(x) for x, m in zip(ids[r], mask[r]) if m]
    for t in range(int(oracle.lengths[r])):
      lp = _next_logp(slm_t, prompt, list(oracle.tokens[r, :t]), enc_dec)
      feats.append(np.sort(np.exp(lp))[::-1][:k])
      labels.append(int(np.argmax(lp)) != int(oracle.tokens[r, t]))
  feats, labels = np.array(feats), np.array(labels)
  if labels.all() or not labels.any():
    labels[:2] = [True, False]  # two classes, whatever these models do
  router = svm_router.fit(feats, labels, kernel="rbf", k=k)
  sk = SVC(kernel="rbf", C=1.0, gamma=router.gamma, class_weight="balanced").fit(feats, labels)

  def decide(lp):
    return bool(sk.predict(np.sort(np.exp(lp))[::-1][:k][None].astype(np.float64))[0])

  out = _run(pair, Router("svm", svm=router), eos)
  tokens, used = _reference(pair, ids, mask, eos, decide)
  np.testing.assert_array_equal(out.trace["large_used"], used)
  np.testing.assert_array_equal(out.tokens, tokens)


def test_bad_arguments_are_named(pair):
  ((_, llm, llm_p), (_, slm, slm_p)), _ = pair
  ids, mask = _prompts()
  with pytest.raises(ValueError, match="router kind 'best'"):
    routed_generate(
      [llm, slm], [llm_p, slm_p], ids, mask, router=Router("best"), max_new_tokens=N, eos_id=1
    )
  with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
    routed_generate(
      [llm, slm],
      [llm_p, slm_p],
      ids,
      mask,
      router=Router("never"),
      max_new_tokens=N,
      eos_id=1,
      chunk=0,
    )
  with pytest.raises(ValueError, match="takes a trained SvmRouter"):
    routed_generate(
      [llm, slm], [llm_p, slm_p], ids, mask, router=Router("svm"), max_new_tokens=N, eos_id=1
    )
  with pytest.raises(ValueError, match=r"Routed decodes with 2 models \(large, small\), got 1"):
    routed_generate([llm], [llm_p], ids, mask, router=Router("never"), max_new_tokens=N)


def _bild_reference(pair, ids, mask, eos, gamma, threshold):
  """BiLD's rollback row by row with transformers: the SLM drafts gamma tokens greedily, the
  LLM keeps them while each is its argmax or costs it at most `threshold` nats, replaces the
  first other one by its argmax (or adds its argmax after a full window)."""
  ((llm_t, *_), (slm_t, *_)), enc_dec = pair
  rows = []
  for row in range(ids.shape[0]):
    prompt = [int(x) for x, m in zip(ids[row], mask[row]) if m]
    out = []
    while len(out) < N and eos not in out:
      drafts = []
      for _ in range(gamma):
        drafts.append(int(np.argmax(_next_logp(slm_t, prompt, out + drafts, enc_dec))))
      for i, d in enumerate(drafts + [None]):
        lp = _next_logp(llm_t, prompt, out + drafts[:i], enc_dec)
        if d is not None and (d == int(np.argmax(lp)) or -lp[d] <= threshold):
          continue
        out += drafts[:i] + [int(np.argmax(lp))]
        break
    out = out[: out.index(eos) + 1] if eos in out else out
    out = out[:N]
    rows.append(out + [0] * (N - len(out)))
  return np.array(rows)


def test_bild_rollback_follows_its_reference_and_zero_is_lossless(pair):
  from l2s_jax.collab.speculative import speculative_generate

  ((llm_t, llm, llm_p), (_, slm, slm_p)), enc_dec = pair
  ids, mask = _prompts()
  eos = ref.eos_that_ends_some_rows(llm_t, ids, mask, enc_dec)
  run = lambda t: speculative_generate(
    llm, llm_p, slm, slm_p, ids, mask, max_new_tokens=N, gamma=3, eos_id=eos, rollback=t
  )
  lossless = run(0.0)
  np.testing.assert_array_equal(
    lossless.tokens, ref.torch_greedy(llm_t, ids, mask, N, eos, enc_dec)
  )
  for t in (3.0, 4.0, 5.0, 6.0):  # the first threshold that changes the output
    out = run(t)
    if (out.tokens != lossless.tokens).any():
      break
  assert (out.tokens != lossless.tokens).any(), "no threshold made the rollback lossy"
  assert out.summary()["draft_acceptance"] > lossless.summary()["draft_acceptance"]
  np.testing.assert_array_equal(out.tokens, _bild_reference(pair, ids, mask, eos, 3, t))
  with pytest.raises(ValueError, match=r"rollback=-1(\.0)?: a cross-entropy in nats, >= 0"):
    run(-1.0)
