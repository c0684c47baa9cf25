"""Token choice: Greedy, Temperature, TopK, TopP, and their composition.

Each sampler is a frozen dataclass (hashable, so it can be a static argument
of a jitted function) with two methods:

  log_probs(logits [B, V]) -> [B, V]  the distribution a token is drawn from,
                                      after this sampler's processing
                                      (one-hot for greedy; -inf = excluded)
  sample(rng, logits [B, V]) -> [B]   a draw from exactly that distribution

Speculative sampling needs the first to be *exactly* what the second draws
from; keeping both on one object is how that is guaranteed.

Compose with `chain(Temperature(0.7), TopK(40), TopP(0.9))`; processing runs
in the given order (transformers applies temperature, then top-k, then top-p).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


class Sampler:
  """Base: subclasses define `process` (logits -> logits) or override both methods."""

  greedy: bool = False

  def validate(self) -> None:
    pass

  def process(self, logits_BV: Array) -> Array:
    return logits_BV

  def log_probs(self, logits_BV: Array) -> Array:
    logits_BV = logits_BV.astype(jnp.float32)
    if self.greedy:
      return _one_hot_log(argmax(logits_BV), logits_BV.shape[-1])
    return jax.nn.log_softmax(self.process(logits_BV), axis=-1)

  def sample(self, rng: Array, logits_BV: Array) -> Array:
    logits_BV = logits_BV.astype(jnp.float32)
    if self.greedy:
      return argmax(logits_BV)
    return jax.random.categorical(rng, self.process(logits_BV), axis=-1).astype(jnp.int32)


def argmax(x_BV: Array) -> Array:
  """int32 [...]: the first index of the largest value along the last axis, as jnp.argmax
  and torch.argmax give it (for rows without NaN), computed as two reductions: the row's
  max, then the smallest index holding it. Over a vocabulary split across chips (tensor
  parallelism) each is an all-reduce of one number per row; jnp.argmax's (value, index)
  reduction made the compiler all-gather every chip's partial results instead."""
  m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  v = x_BV.shape[-1]
  return jnp.minimum(jnp.min(jnp.where(x_BV == m_B1, iota, v), axis=-1), v - 1)  # NaN rows: V-1


def _one_hot_log(ids_B: Array, vocab: int) -> Array:
  return jnp.where(jax.nn.one_hot(ids_B, vocab, dtype=bool), 0.0, NEG_INF)


@dataclasses.dataclass(frozen=True)
class Greedy(Sampler):
  """argmax (the first index among ties, as torch.argmax)."""

  greedy = True


@dataclasses.dataclass(frozen=True)
class Temperature(Sampler):
  """Samples from softmax(logits / temperature); temperature 0 is greedy."""

  temperature: float = 1.0

  def validate(self) -> None:
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")

  @property
  def greedy(self) -> bool:  # type: ignore[override]
    return self.temperature == 0

  def process(self, logits_BV: Array) -> Array:
    return logits_BV / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK(Sampler):
  """Keeps the k largest logits (and any tied with the k-th), as transformers."""

  k: int = 50

  def validate(self) -> None:
    if not (isinstance(self.k, int) and self.k >= 1):
      raise ValueError(f"top-k needs an integer k >= 1, got {self.k!r}")

  def process(self, logits_BV: Array) -> Array:
    k = min(self.k, logits_BV.shape[-1])
    kth = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth, NEG_INF, logits_BV)


@dataclasses.dataclass(frozen=True)
class TopP(Sampler):
  """Nucleus: the smallest set of most likely tokens with mass >= p."""

  p: float = 0.9

  def validate(self) -> None:
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f"top-p needs p in (0, 1], got {self.p}")

  def process(self, logits_BV: Array) -> Array:
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < self.p  # the top token always stays
    keep = (
      jnp.zeros_like(keep_sorted)
      .at[jnp.arange(logits_BV.shape[0])[:, None], order]
      .set(keep_sorted)
    )
    return jnp.where(keep, logits_BV, NEG_INF)


@dataclasses.dataclass(frozen=True)
class Chain(Sampler):
  """Applies the processing of each sampler in turn, then samples."""

  samplers: tuple[Sampler, ...] = ()

  def validate(self) -> None:
    for s in self.samplers:
      s.validate()
      if isinstance(s, Greedy):
        raise ValueError("Greedy cannot be chained; use it alone")

  @property
  def greedy(self) -> bool:  # type: ignore[override]
    return any(s.greedy for s in self.samplers)

  def process(self, logits_BV: Array) -> Array:
    for s in self.samplers:
      logits_BV = s.process(logits_BV)
    return logits_BV


def chain(*samplers: Sampler) -> Chain:
  return Chain(tuple(samplers))
