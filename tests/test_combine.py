"""Contrastive, proxy and routed decoding against a plain NumPy reference, step by step.

The reference recomputes every model's next-token distribution with a full
transformers (PyTorch) forward over prompt + tokens so far, one row at a
time, applies the formulas written out in NumPy, and takes the argmax.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.collab.combine import Contrastive, Proxy, Router, collab_generate

N = 10
EOS = 1


def _log_softmax(z):
  z = z - z.max()
  return z - np.log(np.exp(z).sum())


def _next_logp(torch_model, prompt, generated, enc_dec):
  if enc_dec:
    z = ref.torch_logits(
      torch_model, input_ids=np.asarray([prompt]), decoder_input_ids=np.asarray([[0] + generated])
    )
  else:
    z = ref.torch_logits(torch_model, input_ids=np.asarray([prompt + generated]))
  return _log_softmax(z[0, -1].astype(np.float64))


def np_contrastive(lp_l, lp_s, alpha, beta, form):
  score = lp_l - beta * lp_s if form == "li" else lp_s + beta * (lp_l - lp_s)
  keep = np.exp(lp_l) >= alpha * np.exp(lp_l).max()
  return np.where(keep, score, -np.inf)


def np_route(lp_s, kind, t):
  p = np.sort(np.exp(lp_s))[::-1]
  return {
    "never": False,
    "always": True,
    "top1": p[0] < t,
    "margin": p[0] - p[1] < t,
    "entropy": -(np.exp(lp_s) * lp_s).sum() > t,
  }[kind]


def reference(torch_models, prompts, rule, enc_dec):
  """Greedy decoding of `rule(logps) -> (scores, routed)` with full forwards: tokens, routed."""
  tokens, routed = np.zeros((len(prompts), N), int), np.zeros((len(prompts), N), bool)
  for row, prompt in enumerate(prompts):
    generated = []
    for t in range(N):
      logps = [_next_logp(m, prompt, generated, enc_dec) for m in torch_models]
      scores, used = rule(logps)
      tok = int(np.argmax(scores))
      tokens[row, t], routed[row, t] = tok, used
      generated.append(tok)
      if tok == EOS:
        break
  return tokens, routed


@pytest.fixture(scope="module", params=["gpt2", "t5"])
def trio(request, tmp_path_factory):
  """Three unrelated random models of one family (LLM, SLM tuned, SLM base), 97 ids."""
  out = []
  for seed in (0, 1, 2):
    if request.param == "gpt2":
      tm = ref.gpt2(seed=seed, n_layer=3 if seed == 0 else 1, initializer_range=0.1)
    else:
      tm = ref.t5(seed=seed, num_decoder_layers=2 if seed == 0 else 1)
    path = tmp_path_factory.mktemp(f"{request.param}{seed}")
    tm.save_pretrained(path)
    out.append((tm,) + hf.load(str(path)))
  return out, request.param == "t5"


def _prompts():
  ids, mask = ref.padded_batch(4, 4, 7, 97, left_pad=[(1, 3), (2, 1)])
  return ids, mask, [list(r[m.astype(bool)]) for r, m in zip(ids, mask)]


def _check(trio, combiner, rule, n_models):
  models, enc_dec = trio
  ids, mask, prompts = _prompts()
  out = collab_generate(
    [m[1] for m in models[:n_models]],
    [m[2] for m in models[:n_models]],
    ids,
    mask,
    combiner=combiner,
    max_new_tokens=N,
    eos_id=EOS,
  )
  exp_tokens, exp_routed = reference([m[0] for m in models[:n_models]], prompts, rule, enc_dec)
  valid = out.valid()
  np.testing.assert_array_equal(np.where(valid, out.tokens, 0), exp_tokens)
  np.testing.assert_array_equal(out.trace["large_used"] & valid, exp_routed)
  return out


@pytest.mark.parametrize("form,beta", [("fsgen", 0.5), ("li", 0.7)])
def test_contrastive_equals_numpy(trio, form, beta):
  alpha = 0.1
  out = _check(
    trio,
    Contrastive(alpha, beta, form),
    lambda lp: (np_contrastive(lp[0], lp[1], alpha, beta, form), True),
    2,
  )
  # The combination matters: some chosen tokens are neither model's own greedy token.
  v = out.valid()
  assert ((out.tokens != out.trace["large_choice"]) & v).any() or (
    (out.tokens != out.trace["small_choice"]) & v
  ).any()


def test_proxy_tuning_equals_numpy(trio):
  out = _check(trio, Proxy(alpha=1.0), lambda lp: (lp[0] + 1.0 * (lp[1] - lp[2]), True), 3)
  assert ((out.tokens != out.trace["large_choice"]) & out.valid()).any()


def _statistic(lp_s, kind):
  p = np.sort(np.exp(lp_s))[::-1]
  return {"top1": p[0], "margin": p[0] - p[1], "entropy": -(np.exp(lp_s) * lp_s).sum()}[kind]


@pytest.mark.parametrize("kind", ["never", "always", "top1", "margin", "entropy"])
def test_router_equals_numpy(trio, kind):
  threshold = 0.0
  if kind in ("top1", "margin", "entropy"):
    # A threshold in the middle of what the SLM shows on these prompts, so the rule splits.
    stats = []
    models, enc_dec = trio
    reference(
      [models[1][0]],
      _prompts()[2],
      lambda lp: (stats.append(_statistic(lp[0], kind)) or lp[0], False),
      enc_dec,
    )
    threshold = float(np.median(stats))

  def rule(lp):
    used = np_route(lp[1], kind, threshold)
    return (lp[0] if used else lp[1]), used

  out = _check(trio, Router(kind, threshold), rule, 2)
  if kind in ("top1", "margin", "entropy"):
    assert 0.0 < out.summary()["large_call_rate"] < 1.0, out.summary()[
      "large_call_rate"
    ]  # the rule really splits tokens
  if kind == "always":
    assert (out.tokens == out.trace["large_choice"])[out.valid()].all()
    assert out.summary()["collaboration_frequency"] == pytest.approx(
      float((out.trace["large_choice"] != out.trace["small_choice"])[out.valid()].mean())
    )
  if kind == "never":
    assert (
      out.summary()["large_call_rate"] == 0.0 and out.summary()["collaboration_frequency"] == 0.0
    )


def test_margin_router_forms_hand_computed():
  """p = (0.6, 0.3, 0.1): p1 - p2 = 0.3, FS-GEN's (p1 - p2) / 2 = 0.15."""
  lp = jnp.log(jnp.asarray([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05]]))
  fired = lambda form, t: np.asarray(Router("margin", t, margin_form=form).route((lp, lp)))
  assert fired("difference", 0.2).tolist() == [False, False]
  assert fired("half", 0.2).tolist() == [True, False]  # 0.15 < 0.2; 0.425 is not
  assert fired("difference", 0.31).tolist() == [True, False]
  assert fired("half", 0.43).tolist() == [True, True]
  with pytest.raises(ValueError, match="margin_form 'third'"):
    Router("margin", 0.2, margin_form="third").validate()


def test_vocabularies_are_aligned_or_refused(tmp_path):
  from l2s_jax.decoding.vocab import common_vocab

  a, b, c = (ref.gpt2(seed=s, vocab_size=v) for s, v in ((0, 200), (1, 199), (2, 64)))
  loaded = []
  for name, tm in zip("abc", (a, b, c)):
    tm.save_pretrained(tmp_path / name)
    loaded.append(hf.load(str(tmp_path / name))[0])
  assert common_vocab(loaded[:2]) == 199  # padding rows: cut to the common size
  assert common_vocab(loaded[:2], tokenizer_size=190) == 199
  with pytest.raises(ValueError, match="differ by more than padding.*200.*64"):
    common_vocab([loaded[0], loaded[2]])
  with pytest.raises(ValueError, match="do not cover the tokenizer's 80"):
    common_vocab([loaded[0], loaded[2]], tokenizer_size=80)
  with pytest.raises(ValueError, match="Combined decodes with 3 models"):
    collab_generate(
      loaded[:2], [None, None], np.asarray([[2, 3]]), combiner=Proxy(), max_new_tokens=2
    )
