"""FS-GEN's SVM router: the in-JAX decision equals scikit-learn's own predict, row for row."""

import dataclasses
import functools
import json
import re

import jax
import numpy as np
import pytest
from sklearn.svm import SVC

from l2s_jax.collab import svm_router
from l2s_jax.collab.svm_router import RouterDataError, RouterFileError, SvmRouter

K, V, N = 8, 64, 300


def oracle_run(seed=0, n=N):
  """Random SLM logits [n, V] at temperatures from peaked to flat, and noisy labels: the LLM
  differs when the SLM is unsure (top-1 probability under 0.5), 15% of labels flipped."""
  rng = np.random.default_rng(seed)
  logits_NV = rng.standard_normal((n, V)) * rng.uniform(0.3, 5.0, (n, 1))
  p_NV = np.exp(logits_NV - logits_NV.max(-1, keepdims=True))
  p_NV /= p_NV.sum(-1, keepdims=True)
  labels_N = (p_NV.max(-1) < 0.5) ^ (rng.uniform(size=n) < 0.15)
  return logits_NV.astype(np.float32), labels_N


@jax.jit
def features_jit(logp_BV):
  return svm_router.features(logp_BV, K)


@pytest.fixture(scope="module")
def data():
  logits_NV, labels_N = oracle_run()
  logp_NV = np.asarray(jax.nn.log_softmax(logits_NV, axis=-1))
  x_NK = np.asarray(features_jit(logp_NV), dtype=np.float64)
  return logp_NV, x_NK, labels_N


def decide_jit(router, logp_BV):
  return np.asarray(jax.jit(lambda lp, r: r.decide(lp), static_argnums=1)(logp_BV, router))


def sklearn_svc(kernel, x_NK, labels_N):
  return SVC(kernel=kernel, C=1.0, gamma="scale", class_weight="balanced").fit(x_NK, labels_N)


def test_features_are_numpy_top_k_of_softmax():
  logits_NV, _ = oracle_run(seed=1, n=16)
  z = logits_NV.astype(np.float64)
  p_NV = np.exp(z - z.max(-1, keepdims=True))
  p_NV /= p_NV.sum(-1, keepdims=True)
  expected_NK = -np.sort(-p_NV, axis=-1)[:, :K]
  logp_NV = jax.nn.log_softmax(logits_NV, axis=-1)
  np.testing.assert_allclose(features_jit(logp_NV), expected_NK, rtol=1e-5, atol=1e-7)
  # Raw logits give the same features (renormalised inside), masked (-inf) entries give 0.
  np.testing.assert_allclose(features_jit(logits_NV), expected_NK, rtol=1e-5, atol=1e-7)
  masked = np.full((1, V), -np.inf, np.float32)
  masked[0, :3] = np.log([0.5, 0.3, 0.2])
  np.testing.assert_allclose(features_jit(masked)[0], [0.5, 0.3, 0.2] + [0.0] * (K - 3), rtol=1e-6)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_decide_in_jax_equals_sklearn_predict(data, kernel):
  logp_NV, x_NK, labels_N = data
  svc = sklearn_svc(kernel, x_NK, labels_N)
  want_N = svc.predict(x_NK).astype(bool)
  assert 0.2 < want_N.mean() < 0.8  # both decisions are well represented
  router = svm_router.fit(x_NK, labels_N, kernel=kernel)
  if kernel == "rbf":
    assert router.gamma == pytest.approx(svc._gamma, rel=1e-12)
  got_N = decide_jit(router, logp_NV)
  assert got_N.dtype == bool and got_N.shape == (N,)
  np.testing.assert_array_equal(got_N, want_N)
  # The decision values themselves, not just their signs.
  np.testing.assert_allclose(np.asarray(router.score(x_NK)), svc.decision_function(x_NK), atol=1e-4)

  # Negative controls on the same rows: the opposite sign convention, or (rbf) a wrong gamma,
  # would be caught by the comparison above.
  if kernel == "linear":
    flipped = SvmRouter("linear", K, -router.intercept, w_K=-router.w_K)
  else:
    flipped = SvmRouter(
      "rbf", K, -router.intercept, sv_SK=router.sv_SK, dual_S=-router.dual_S, gamma=router.gamma
    )
    wrong_gamma = dataclasses.replace(router, gamma=1.0 / K)  # sklearn's "auto"
    assert (decide_jit(wrong_gamma, logp_NV) != want_N).sum() >= 20
  assert (decide_jit(flipped, logp_NV) != want_N).mean() > 0.9


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_class_one_means_the_llm_differs_whatever_the_label_encoding(data, kernel):
  """Labels as bools or ints give the same router; flipped labels follow sklearn's predict of
  the flipped problem (True there = "differs" in that problem's own terms)."""
  logp_NV, x_NK, labels_N = data
  as_bool = svm_router.fit(x_NK, labels_N, kernel=kernel)
  as_int = svm_router.fit(x_NK, labels_N.astype(np.int32), kernel=kernel)
  assert as_bool == as_int
  flipped = svm_router.fit(x_NK, ~labels_N, kernel=kernel)
  want_N = sklearn_svc(kernel, x_NK, ~labels_N).predict(x_NK).astype(bool)
  np.testing.assert_array_equal(decide_jit(flipped, logp_NV), want_N)
  assert (decide_jit(flipped, logp_NV) != decide_jit(as_bool, logp_NV)).mean() > 0.9


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_save_load_round_trip_decides_the_same(tmp_path, data, kernel):
  logp_NV, x_NK, labels_N = data
  router = svm_router.fit(x_NK, labels_N, kernel=kernel)
  path = str(tmp_path / "router.json")
  svm_router.save(router, path)
  obj = json.load(open(path))
  assert (obj["format"], obj["version"], obj["kernel"], obj["k"]) == (
    svm_router.FORMAT,
    svm_router.VERSION,
    kernel,
    K,
  )
  loaded = svm_router.load(path, k=K)
  assert loaded == router and hash(loaded) == hash(router)  # same jit cache entry
  for a, b in (
    (loaded.w_K, router.w_K),
    (loaded.sv_SK, router.sv_SK),
    (loaded.dual_S, router.dual_S),
  ):
    assert (a is None and b is None) or np.array_equal(a, b)
  np.testing.assert_array_equal(decide_jit(loaded, logp_NV), decide_jit(router, logp_NV))


def test_a_router_is_a_static_jit_argument_compiled_once_per_router(data):
  logp_NV, x_NK, labels_N = data
  traces = []

  @functools.partial(jax.jit, static_argnums=1)
  def step(logp_BV, router):
    traces.append(router.kernel)
    return router.decide(logp_BV)

  a = svm_router.fit(x_NK, labels_N, kernel="linear")
  a_again = svm_router.fit(x_NK, labels_N, kernel="linear")  # equal, another object
  b = svm_router.fit(x_NK, labels_N, kernel="linear", C=0.01)
  assert a is not a_again and a == a_again and a != b
  for r in (a, a_again, b):
    step(logp_NV, r)
  assert len(traces) == 2


def test_load_refuses_a_width_mismatch_a_malformed_and_a_missing_file(tmp_path, data):
  _, x_NK, labels_N = data
  path = str(tmp_path / "r.json")
  svm_router.save(svm_router.fit(x_NK, labels_N, kernel="linear"), path)
  with pytest.raises(RouterFileError, match=rf"{re.escape(path)}.*k={K}; expected k=4"):
    svm_router.load(path, k=4)

  bad = tmp_path / "bad.json"
  bad.write_text(open(path).read()[:40])  # truncated
  with pytest.raises(RouterFileError, match=f"{re.escape(str(bad))}.*not readable JSON"):
    svm_router.load(str(bad))
  obj = json.load(open(path))
  del obj["w"]
  bad.write_text(json.dumps(obj))
  with pytest.raises(RouterFileError, match=f"{re.escape(str(bad))}.*malformed: missing field 'w'"):
    svm_router.load(str(bad))
  obj["w"] = [1.0] * (K - 1)
  bad.write_text(json.dumps(obj))
  with pytest.raises(RouterFileError, match=f"{re.escape(str(bad))}.*malformed"):
    svm_router.load(str(bad))
  bad.write_text(json.dumps({"format": "something else"}))
  with pytest.raises(RouterFileError, match=f"{re.escape(str(bad))}.*not an SVM router"):
    svm_router.load(str(bad))
  missing = str(tmp_path / "none.json")
  with pytest.raises(RouterFileError, match=f"{re.escape(missing)}.*does not exist"):
    svm_router.load(missing)


def test_fit_refuses_data_it_cannot_use(data):
  _, x_NK, labels_N = data
  with pytest.raises(RouterDataError, match="one class only: all 300 are 0"):
    svm_router.fit(x_NK, np.zeros(N, bool))
  with pytest.raises(RouterDataError, match="one class only: all 300 are 1"):
    svm_router.fit(x_NK, np.ones(N, int), kernel="rbf")
  with pytest.raises(
    RouterDataError,
    match=r"feature width mismatch: features are \[N, 8\], "
    r"expected k=4",
  ):
    svm_router.fit(x_NK, labels_N, k=4)
  with_nan = x_NK.copy()
  with_nan[[3, 7], 1] = np.nan
  with pytest.raises(RouterDataError, match=r"NaN or inf in 2 rows \(first: \[3, 7\]\)"):
    svm_router.fit(with_nan, labels_N)
  with pytest.raises(RouterDataError, match="labels have NaN"):
    svm_router.fit(x_NK, np.where(labels_N, 1.0, np.nan))
  with pytest.raises(RouterDataError, match="labels must be bool or 0/1"):
    svm_router.fit(x_NK, np.where(labels_N, 1, -1))
  with pytest.raises(RouterDataError, match="one per feature row"):
    svm_router.fit(x_NK, labels_N[:-1])
  with pytest.raises(RouterDataError, match="kernel must be one of"):
    svm_router.fit(x_NK, labels_N, kernel="poly")
