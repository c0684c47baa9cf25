"""The optimizer a config's `opt` group describes: AdamW with a warmup and a decay schedule,
optional global-norm clipping, and per-path learning-rate factors (`opt.lr_multipliers`).

It reads the config, so it sits with the assembly, above the engines (`train_step` takes the
optimizer it builds).
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax

from l2s_jax import config_schema
from l2s_jax.checkpoint import path_name


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = (
    opt.warmup_steps if opt.warmup_steps >= 0 else int(round(opt.warmup_fraction * total_steps))
  )
  warmup = min(warmup, max(total_steps - 1, 0))
  peak, end = opt.learning_rate, opt.learning_rate * opt.end_lr_fraction
  decay = max(total_steps - warmup, 1)
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=opt.end_lr_fraction)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay)
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """AdamW behind optional global-norm clipping, then per-path learning-rate factors
  (opt.lr_multipliers); returns (tx, schedule)."""
  schedule = learning_rate_schedule(opt, total_steps)
  parts = []
  if opt.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  parts.append(
    optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
  )
  if rules := config_schema.lr_multipliers(opt):
    parts.append(scale_by_path(rules))
  return optax.chain(*parts), schedule


def scale_by_path(rules: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each update by the factor of the first regex its param path matches
  (after AdamW: a per-param learning rate, weight decay included); a regex that
  matches no param is an error naming it."""
  compiled = [(re.compile(p), f) for p, f in rules.items()]

  def factor(path) -> float:
    name = path_name(path)
    return next((f for r, f in compiled if r.search(name)), 1.0)

  def init(params):
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for r, _ in compiled:  # (optax.tree_map_params inits on a tree without leaves)
      if names and not any(r.search(n) for n in names):
        raise ValueError(f"opt.lr_multipliers: {r.pattern!r} matches no param (e.g. {names[:3]})")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

  return optax.GradientTransformation(init, update)
