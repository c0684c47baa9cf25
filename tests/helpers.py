"""Helpers several test modules share (no PyTorch here: the references are in
torch_reference.py). Test modules import from here, never from each other."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from l2s_jax.models import t5

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, "configs")


def config_path(name: str = "tiny.py") -> str:
  """The path of a config file in configs/ (for --config= flags)."""
  return os.path.join(CONFIGS, name)


def load_config(name: str = "tiny.py", *args):
  """`get_config(*args)` of configs/<name>, loaded from its file (configs/ is no package)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(name)[0], config_path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


# A small T5 v1.1 (97 ids, 2 + 2 layers): the LLM of the hybrid and export tests.
LLM_CFG = dataclasses.replace(
  t5.PRESETS["t5-v1_1-small"],
  vocab_size=97,
  d_model=48,
  d_kv=8,
  d_ff=64,
  num_layers=2,
  num_decoder_layers=2,
  num_heads=4,
)


def record_query_widths(monkeypatch, block: int) -> list[int]:
  """Sets layers.QUERY_BLOCK = block; returns the widths every attention core is traced at."""
  from l2s_jax.models import layers

  widths, core = [], layers._attend
  monkeypatch.setattr(layers, "QUERY_BLOCK", block)
  monkeypatch.setattr(
    layers, "_attend", lambda q, *a, **k: widths.append(q.shape[1]) or core(q, *a, **k)
  )
  return widths


def chi_square_pvalue(draws, expected_p) -> float:
  """Chi-square goodness of fit of draws against the exact distribution `expected_p`.

  draws: [N] token ids for a [V] distribution, or [N, k] tuples for a [V] * k one (e.g.
  (x1, x2) pairs against P(x1, x2)). Cells expected < 5 are pooled into one; a draw the
  distribution gives probability 0 is a certain misfit (p = 0).
  """
  import scipy.stats

  expected_p = np.asarray(expected_p, np.float64)
  draws = np.asarray(draws).reshape(len(draws), -1)
  if draws.shape[1] != expected_p.ndim:
    raise ValueError(f"draws of {draws.shape[1]} tokens against a {expected_p.ndim}-d distribution")
  counts = np.zeros(expected_p.shape)
  np.add.at(counts, tuple(draws.T), 1)
  expected = expected_p.ravel() * len(draws)
  counts = counts.ravel()
  if counts[expected == 0].sum() > 0:
    return 0.0  # a token the distribution never produces
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  exp = exp[keep] * obs[keep].sum() / exp[keep].sum()
  return scipy.stats.chisquare(obs[keep], exp).pvalue
