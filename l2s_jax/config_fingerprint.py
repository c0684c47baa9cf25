"""Resume fingerprints: the config values a checkpoint is written under, which it may only be
resumed under, and the config a trained workdir's checkpoint is rebuilt from.

A fingerprint is a plain JSON dict (it is stored in the checkpoint's metadata). Checkpoints
written by earlier versions are read in this version's form (`normalize`): retired fields are
dropped and the structured fields' old JSON strings parsed, so they resume under the equivalent
config of today.
"""

from __future__ import annotations

import json

import ml_collections

from l2s_jax import config_schema

# Groups whose values decide what a checkpoint contains and how training
# continues; a workdir's checkpoint is only resumed under the same values.
RESUME_GROUPS = ("model", "llm", "slm", "projector", "opt", "data")
RESUME_TRAIN_FIELDS = ("batch_size", "compute_dtype")
# (group, field) of RESUME_GROUPS that change how fast batches are built, never which: a run
# resumes under any value of them.
FREE_FIELDS = (("data", "workers"), ("data", "prefetch"))
# (group, field) that earlier checkpoints' fingerprints hold and this version has dropped.
# train.seed was never read (`seed` seeds the params' init, data.seed the data order).
RETIRED_FIELDS = (("train", "seed"),)


def normalize(fp: dict) -> dict:
  """A fingerprint (or any config as a dict) in this version's form: RETIRED_FIELDS dropped,
  the structured fields (config_schema.STRUCTURED_FIELDS) in their structured form whichever
  form they were saved in, as JSON values. The input is not changed."""

  def walk(node, prefix):
    if not isinstance(node, dict):
      return node
    out = {}
    for key, value in node.items():
      if key in config_schema.STRUCTURED_FIELDS and isinstance(value, (str, dict, list, tuple)):
        value = config_schema.structured(key, value, f"{prefix}{key}", warn=False)
      out[key] = walk(value, f"{prefix}{key}.")
    return out

  out = walk(fp, "")
  for group, field in RETIRED_FIELDS:
    if isinstance(out.get(group), dict):
      out[group].pop(field, None)
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def from_fingerprint(fp: dict) -> ml_collections.ConfigDict:
  """A config with the values a checkpoint's fingerprint holds (model, data, optimizer and
  the training fields that shape it); the rest at their defaults."""
  c = config_schema.base_config()

  def fill(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise ValueError(f"the fingerprint holds {prefix}{key}, which this version does not know")
      if (
        isinstance(node[key], ml_collections.ConfigDict)
        and key not in config_schema.STRUCTURED_FIELDS
      ):
        fill(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value

  fill(c, normalize(fp), "")
  return c


def resume_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The values a checkpoint may only be resumed under, as a plain dict."""
  out = {g: config[g].to_dict() for g in RESUME_GROUPS}
  out["train"] = {k: config.train[k] for k in RESUME_TRAIN_FIELDS}
  for group, field in FREE_FIELDS:
    out[group].pop(field, None)
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def diff_fingerprints(
  saved: dict,
  current: dict,
  prefix: str = "",
  *,
  names: tuple[str, str] = ("checkpoint", "config"),
  defaults: dict | None = None,
) -> list[str]:
  """The fields that differ, dotted, with both values labelled by `names`. `defaults` (a
  fingerprint of `base_config()`): a field `saved` lacks (written before the field existed)
  is no difference while `current` holds its default. Both sides are compared in this
  version's form (`normalize`)."""
  return _diff(
    normalize(saved), normalize(current), prefix, names, normalize(defaults) if defaults else {}
  )


def _diff(
  saved: dict, current: dict, prefix: str, names: tuple[str, str], defaults: dict
) -> list[str]:
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      sub = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
      out += _diff(a, b, f"{prefix}{key}.", names, sub)
    elif key not in saved and key in defaults and defaults[key] == b:
      continue
    elif a != b:
      out.append(f"{prefix}{key}: {names[0]} {a!r} vs {names[1]} {b!r}")
  return out
