"""What every decoding method shares: its spec's protocol, its output, prefill and extend.

A method is a *spec*: a frozen dataclass of the method's static settings (hashable, so the
front jits with it static, as gemma's `SamplerLoop`). It checks itself (`validate`), says
how many models it decodes with and how much cache slack it needs, runs its loop inside the
front's one jit (`run`), and defines its statistics once (`finish` turns the loop's arrays
into per-row counts, `summarize` turns summed counts into the numbers a report shows).

Statistics vocabulary (one name per quantity, used by eval, the study and the benches):
  generated_tokens          tokens generated, stop tokens included
  large_call_rate           calls of the large model per generated token
  tokens_per_large_call     its inverse (speculative decoding)
  collaboration_frequency   share of tokens unlike the small model's own greedy choice
  batch_call_rate           share of a batch's decoding steps at which the large model ran
  large_tokens_read_per_token  tokens the large model read after the prompt, per token (every
                            row of the batch: its work; above 1 when rows finish early)
  acceptance_rate, acceptance_by_position, draft_acceptance, correction_rate  (speculative)
Models are ordered (large, small, ...) in every collaborative method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import flax.struct
import jax
import numpy as np

Array = jax.Array


class SpecError(ValueError):
  """A spec's setting breaks one of its rules.

  `message` is a template with `{name}` where the setting's name goes: the spec's field
  name here, the config field's name when `l2s_jax.config_decode` re-raises it.
  """

  def __init__(self, field: str, message: str):
    self.field, self.message = field, message
    super().__init__(message.format(name=field))

  def renamed(self, name: str) -> ValueError:
    return ValueError(self.message.format(name=name))


@dataclasses.dataclass(frozen=True)
class Decoded:
  """What every method returns (host arrays of the caller's B rows).

  tokens:      int32 [B, N]  chosen tokens, pad after each row's stop token
  lengths:     int32 [B]     tokens of each row, its stop token included
  stats:       per-row counts of the method ([B] or [B, ...]); they add up over rows
  batch_stats: per-call counts (the batch moves together: steps, large-model runs)
  trace:       per-token records ([B, N, ...]) of the collaborative methods, for analyses
  logprobs:    f32 [B, N] log p(token) when asked for; beam search: None
  scores:      f32 [B] beam search's sequence scores; None otherwise
  """

  tokens: np.ndarray
  lengths: np.ndarray
  stats: dict[str, np.ndarray]
  batch_stats: dict[str, float]
  trace: dict[str, np.ndarray]
  spec: Any
  logprobs: np.ndarray | None = None
  scores: np.ndarray | None = None

  def valid(self) -> np.ndarray:
    """bool [B, N]: the slot holds a generated token."""
    return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

  def summary(self) -> dict:
    """The method's report numbers over this call's rows."""
    return summarize(self.spec, [self])


def summarize(spec, outputs: Sequence[Decoded]) -> dict:
  """The method's report numbers over several calls: counts summed, then `spec.summarize`."""
  return spec.summarize(*sum_stats([o.stats for o in outputs], [o.batch_stats for o in outputs]))


def sum_stats(row_stats: Sequence[dict], batch_stats: Sequence[dict]):
  """(per-row counts summed over rows [and calls], per-call counts summed over calls)."""
  rows = {
    k: sum(np.asarray(s[k]).sum(0) for s in row_stats) for k in (row_stats[0] if row_stats else ())
  }
  calls = {
    k: sum(float(s.get(k, 0.0)) for s in batch_stats)
    for k in (batch_stats[0] if batch_stats else ())
  }
  return rows, calls


@flax.struct.dataclass
class Inputs:
  """The prepared prompts a method's loop reads (arrays, or ShapeDtypeStructs when lowered).

  ids, mask:  int32 [B', P]  right-padded, bucketed; B' the caller's rows padded for the mesh
  extras:     per model, more inputs of its prefill ([B', ...] arrays)
  stops_E:    int32 [E]      distinct ids that end a row (traced: no recompile)
  pad_id:     int32 []
  cache_lens: per model, its cache slots (static)
  """

  ids: Array
  mask: Array
  extras: tuple
  stops_E: Array
  pad_id: Array
  cache_lens: tuple = flax.struct.field(pytree_node=False)


class DecodeSpec:
  """Base of every method's spec. Subclasses are frozen dataclasses."""

  num_models: ClassVar[int] = 1
  # Outputs of `run` that are per call, not per row (the front does not cut them to B rows).
  per_call_outputs: ClassVar[tuple[str, ...]] = ()
  # How errors name the models (in order).
  model_names: ClassVar[tuple[str, ...]] = ("the model",)

  def check_settings(self) -> None:
    """The rules of the spec's own settings (SpecError names the setting); the config's
    validation calls this too."""

  def validate(self, max_new_tokens: int) -> None:
    """Everything checked before anything is compiled (ValueError)."""
    self.check_settings()

  @property
  def cache_slack(self) -> int:
    """Cache slots each model needs past the prompt and max_new_tokens."""
    return 0

  def knobs(self, max_new_tokens: int) -> Any:
    """Settings passed traced (a pytree), so that changing them does not recompile."""
    return ()

  def run(self, models, params, inputs: Inputs, rng, knobs, *, max_new_tokens: int, vocab: int):
    """Traceable: the method's loop; returns its arrays ([B', ...] or per call)."""
    raise NotImplementedError

  def finish(self, out: dict[str, np.ndarray], rows: int) -> Decoded:
    """Host arrays of `run` (rows cut back to the caller's B) -> Decoded."""
    raise NotImplementedError

  def summarize(self, stats: dict[str, np.ndarray], batch_stats: dict[str, float]) -> dict:
    return {}


def prefill(models, params, inputs: Inputs):
  """Every model reads the prompts once: ([first logits [B, V]], [KV caches])."""
  firsts, caches = [], []
  for model, p, extra, length in zip(models, params, inputs.extras, inputs.cache_lens):
    first, cache = model.apply(
      {"params": p}, inputs.ids, inputs.mask, max_len=length, method=model.prefill, **extra
    )
    firsts.append(first)
    caches.append(cache)
  return firsts, caches


def extend(model, params, tokens_BT: Array, cache):
  """The model reads T more tokens per row through its cache: (logits [B, T, V], cache)."""
  return model.apply({"params": params}, tokens_BT, cache, method=model.extend)


def next_token_fn(model, params):
  """step_fn(cache, token [B]) -> (logits [B, V] of the next token, cache)."""

  def step(cache, token_B):
    logits, cache = extend(model, params, token_B[:, None], cache)
    return logits[:, -1], cache

  return step
