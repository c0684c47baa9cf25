"""FS-GEN's learned router: an SVM over the SLM's top-k next-token probabilities decides, per
token, whether the LLM is called (Zhang et al. 2024, "Fast and Slow Generating").

Training data comes from an oracle run: for each position, the SLM's sorted top-k
probabilities (`features`) and the label "the LLM's greedy token differs from the SLM's"
(True / 1 = differs = call the LLM). `fit` trains scikit-learn's SVC on the host; the router
it returns holds plain numpy arrays and evaluates the decision function inside JAX, so
`decide` runs in the compiled decode loop:

  linear:  f(x) = x . w + b
  rbf:     f(x) = sum_i dual_i exp(-gamma |x - sv_i|^2) + b
  decide:  f(x) > 0   (True = call the LLM)

These are sklearn's public `coef_` / `dual_coef_` / `intercept_` with its sign convention:
`decision_function > 0` means `classes_[1]`; `fit` checks that class is "differs".

Both kernels use `sklearn.svm.SVC` (linear: `SVC(kernel="linear")`), not `LinearSVC`: one
solver (libsvm) for both, with the same objective (hinge loss, unregularized intercept) and the
same meaning of C and class_weight, so a linear and an rbf router trained on the same data are
comparable in a study; LinearSVC minimises the squared hinge and regularizes its intercept by
default. SVC's training time grows about quadratically with N: it suits the tens of thousands of
oracle tokens a study collects, not millions (subsample for those).

A router is a static argument of `jax.jit` (its arrays become constants of the program), so it
must be hashable: it keeps read-only float64 numpy arrays and hashes / compares by a SHA-256
digest of its kernel, width and array bytes, computed once when it is built. Hashing a tuple of
floats instead would cost a pass over every support vector at each jitted call.

scikit-learn is needed by `fit` alone (imported there); `features`, `decide`, `save` and `load`
run without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax import files

FORMAT = "l2s_jax.svm_router"
VERSION = 1
KERNELS = ("linear", "rbf")


class RouterDataError(ValueError):
  """Training data `fit` cannot use; the message says what is wrong and where."""


class RouterFileError(ValueError):
  """A router file that is missing, malformed, or of another width; the message names it."""


def features(logp_BV: jax.Array, k: int) -> jax.Array:
  """The SLM's top-k next-token probabilities, sorted descending: float32 [B, k].

  logp_BV: [B, V] log-probabilities. They are renormalised here (top-k minus logsumexp), so
  raw logits give the same features; masked entries may be -inf.
  """
  logp_BV = logp_BV.astype(jnp.float32)
  top_BK, _ = jax.lax.top_k(logp_BV, k)
  return jnp.exp(top_BK - jax.nn.logsumexp(logp_BV, axis=-1, keepdims=True))


def _readonly(a) -> np.ndarray | None:
  if a is None:
    return None
  a = np.array(a, dtype=np.float64)
  a.flags.writeable = False
  return a


@dataclasses.dataclass(frozen=True, eq=False)
class SvmRouter:
  """A trained binary SVM over `features(logp, k)`; True = "the LLM differs: call it".

  kernel:     "linear" or "rbf"
  k:          feature width (top-k)
  intercept:  b
  w_K:        float64 [k]     linear weights (None for rbf)
  sv_SK:      float64 [S, k]  support vectors (None for linear)
  dual_S:     float64 [S]     dual coefficients y_i alpha_i, sklearn's sign (None for linear)
  gamma:      the numeric rbf gamma used in training (None for linear)
  """

  kernel: str
  k: int
  intercept: float
  w_K: np.ndarray | None = None
  sv_SK: np.ndarray | None = None
  dual_S: np.ndarray | None = None
  gamma: float | None = None
  digest: str = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.kernel not in KERNELS:
      raise ValueError(f"kernel must be one of {KERNELS}, not {self.kernel!r}")
    w_K, sv_SK, dual_S = _readonly(self.w_K), _readonly(self.sv_SK), _readonly(self.dual_S)
    if self.kernel == "linear":
      if w_K is None or w_K.shape != (self.k,):
        raise ValueError(
          f"linear router of width k={self.k} needs w_K of shape ({self.k},), "
          f"got {None if w_K is None else w_K.shape}"
        )
      if sv_SK is not None or dual_S is not None or self.gamma is not None:
        raise ValueError("a linear router takes w_K only, no sv_SK / dual_S / gamma")
      arrays = (w_K,)
    else:
      if sv_SK is None or dual_S is None or self.gamma is None:
        raise ValueError("an rbf router needs sv_SK, dual_S and gamma")
      if sv_SK.ndim != 2 or sv_SK.shape[1] != self.k or dual_S.shape != sv_SK.shape[:1]:
        raise ValueError(
          f"rbf router of width k={self.k}: sv_SK {sv_SK.shape} and dual_S "
          f"{dual_S.shape} should be [S, {self.k}] and [S]"
        )
      if w_K is not None:
        raise ValueError("an rbf router takes no w_K")
      if not self.gamma > 0:
        raise ValueError(f"rbf gamma must be positive, got {self.gamma}")
      arrays = (sv_SK, dual_S)
    if not all(np.isfinite(a).all() for a in arrays) or not np.isfinite(self.intercept):
      raise ValueError("router arrays and intercept must be finite")
    gamma = None if self.gamma is None else float(self.gamma)
    h = hashlib.sha256(repr((self.kernel, int(self.k), float(self.intercept), gamma)).encode())
    for a in arrays:
      h.update(repr(a.shape).encode())
      h.update(a.astype("<f8").tobytes())
    for name, value in (
      ("w_K", w_K),
      ("sv_SK", sv_SK),
      ("dual_S", dual_S),
      ("k", int(self.k)),
      ("intercept", float(self.intercept)),
      ("gamma", gamma),
      ("digest", h.hexdigest()),
    ):
      object.__setattr__(self, name, value)

  def __hash__(self):
    return hash(self.digest)

  def __eq__(self, other):
    return isinstance(other, SvmRouter) and self.digest == other.digest

  def score(self, x_BK: jax.Array) -> jax.Array:
    """The decision function f(x): float32 [B]; > 0 means "call the LLM"."""
    x_BK = x_BK.astype(jnp.float32)
    if x_BK.shape[-1] != self.k:
      raise ValueError(f"router of width k={self.k} got features of width {x_BK.shape[-1]}")
    if self.kernel == "linear":
      return jnp.einsum("BK,K->B", x_BK, jnp.asarray(self.w_K, jnp.float32)) + self.intercept
    # The difference itself, not |x|^2 - 2 x.sv + |sv|^2: no cancellation near a support vector.
    d_BSK = x_BK[:, None, :] - jnp.asarray(self.sv_SK, jnp.float32)[None]
    k_BS = jnp.exp(-self.gamma * jnp.sum(d_BSK * d_BSK, axis=-1))
    return jnp.einsum("BS,S->B", k_BS, jnp.asarray(self.dual_S, jnp.float32)) + self.intercept

  def decide(self, logp_BV: jax.Array) -> jax.Array:
    """bool [B]: True = call the LLM for this row's token. logp_BV: the SLM's [B, V]
    log-probabilities (or logits)."""
    return self.score(features(logp_BV, self.k)) > 0


def _resolve_gamma(gamma, x_NK: np.ndarray) -> float:
  """sklearn's rule: "scale" = 1 / (k * X.var()) (1.0 for constant X), "auto" = 1 / k."""
  if gamma == "scale":
    var = x_NK.var()
    return 1.0 / (x_NK.shape[1] * var) if var != 0 else 1.0
  if gamma == "auto":
    return 1.0 / x_NK.shape[1]
  if isinstance(gamma, str) or not float(gamma) > 0:
    raise RouterDataError(f"gamma must be 'scale', 'auto' or a positive number, not {gamma!r}")
  return float(gamma)


def _check_data(features_NK, labels_N, k: int | None) -> tuple[np.ndarray, np.ndarray]:
  x_NK = np.asarray(features_NK, dtype=np.float64)
  if x_NK.ndim != 2 or x_NK.shape[1] == 0:
    raise RouterDataError(f"features must be [N, k] with k >= 1, got shape {x_NK.shape}")
  if k is not None and x_NK.shape[1] != k:
    raise RouterDataError(
      f"feature width mismatch: features are [N, {x_NK.shape[1]}], expected k={k}"
    )
  bad = np.flatnonzero(~np.isfinite(x_NK).all(axis=1))
  if bad.size:
    raise RouterDataError(
      f"features have NaN or inf in {bad.size} rows (first: {bad[:5].tolist()})"
    )
  raw = np.asarray(labels_N)
  if raw.ndim != 1 or raw.shape[0] != x_NK.shape[0]:
    raise RouterDataError(
      f"labels must be [N] with N={x_NK.shape[0]} (one per feature row), got shape {raw.shape}"
    )
  if raw.dtype.kind == "f" and np.isnan(raw).any():
    raise RouterDataError(f"labels have NaN in {int(np.isnan(raw).sum())} rows")
  if raw.dtype.kind not in "biuf" or not np.isin(raw, (0, 1)).all():
    raise RouterDataError(
      f"labels must be bool or 0/1 (1 = the LLM's token differs), got "
      f"values {np.unique(raw)[:5].tolist()}"
    )
  y_N = raw.astype(np.int64)
  if np.unique(y_N).size < 2:
    only = "1 (the LLM always differs)" if y_N[0] else "0 (the LLM never differs)"
    raise RouterDataError(
      f"labels have one class only: all {y_N.size} are {only}; an SVM needs both"
    )
  return x_NK, y_N


def fit(
  features_NK,
  labels_N,
  *,
  kernel: str = "linear",
  C: float = 1.0,
  gamma="scale",
  class_weight="balanced",
  seed: int = 0,
  k: int | None = None,
) -> SvmRouter:
  """Trains sklearn's SVC on host data and returns the router.

  features_NK: [N, k] (from `features`); labels_N: [N] bool or 0/1, True = the LLM's greedy
  token differs from the SLM's. kernel: "linear" or "rbf". C, class_weight: SVC's. gamma: rbf
  only; "scale", "auto" or a number, resolved here to the number stored in the router. seed:
  SVC's random_state. k: when given, the width the features must have.
  """
  if kernel not in KERNELS:
    raise RouterDataError(f"kernel must be one of {KERNELS}, not {kernel!r}")
  if not C > 0:
    raise RouterDataError(f"C must be positive, got {C}")
  x_NK, y_N = _check_data(features_NK, labels_N, k)
  from sklearn.svm import SVC  # noqa: PLC0415 (heavy: only fitting a router needs it)

  g = _resolve_gamma(gamma, x_NK) if kernel == "rbf" else None
  svc = SVC(
    kernel=kernel,
    C=C,
    gamma="scale" if g is None else g,
    class_weight=class_weight,
    random_state=seed,
  )
  svc.fit(x_NK, y_N)
  # decision_function > 0 means classes_[1]; make that "differs" whatever sklearn orders.
  sign = {(0, 1): 1.0, (1, 0): -1.0}[tuple(svc.classes_.tolist())]
  intercept = sign * float(svc.intercept_[0])
  if kernel == "linear":
    return SvmRouter("linear", x_NK.shape[1], intercept, w_K=sign * np.asarray(svc.coef_)[0])
  return SvmRouter(
    "rbf",
    x_NK.shape[1],
    intercept,
    sv_SK=svc.support_vectors_,
    dual_S=sign * svc.dual_coef_[0],
    gamma=g,
  )


def to_json(router: SvmRouter) -> dict:
  out = {
    "format": FORMAT,
    "version": VERSION,
    "kernel": router.kernel,
    "k": router.k,
    "intercept": router.intercept,
  }
  if router.kernel == "linear":
    out["w"] = router.w_K.tolist()
  else:
    out.update(
      gamma=router.gamma, support_vectors=router.sv_SK.tolist(), dual_coef=router.dual_S.tolist()
    )
  return out


def save(router: SvmRouter, path: str) -> None:
  """Writes the router as JSON, atomically (floats round-trip exactly)."""
  files.write_json(path, to_json(router))


def load(path: str, k: int | None = None) -> SvmRouter:
  """Reads a router written by `save`. k: when given, the width the router must have."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise RouterFileError(f"router file {path!r} does not exist") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RouterFileError(f"router file {path!r} is not readable JSON: {e}") from None
  if not isinstance(obj, dict) or obj.get("format") != FORMAT:
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    raise RouterFileError(
      f"router file {path!r} is not an SVM router (format {found!r}, expected {FORMAT!r})"
    )
  if obj.get("version") != VERSION:
    raise RouterFileError(
      f"router file {path!r} has format version {obj.get('version')!r}; "
      f"this code reads version {VERSION}"
    )
  try:
    kind = obj["kernel"]
    if kind == "linear":
      router = SvmRouter("linear", int(obj["k"]), float(obj["intercept"]), w_K=obj["w"])
    else:
      router = SvmRouter(
        kind,
        int(obj["k"]),
        float(obj["intercept"]),
        sv_SK=obj["support_vectors"],
        dual_S=obj["dual_coef"],
        gamma=float(obj["gamma"]),
      )
  except (KeyError, TypeError, ValueError) as e:
    what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
    raise RouterFileError(f"router file {path!r} is malformed: {what}") from None
  if k is not None and router.k != k:
    raise RouterFileError(f"router file {path!r} has top-k width k={router.k}; expected k={k}")
  return router
