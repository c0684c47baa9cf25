"""Reading and writing transformers checkpoint directories (no torch needed).

A directory written by `save_pretrained` holds `config.json` and either
`model.safetensors` or shards listed in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from l2s_jax import files

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read as asked."""


def read_config(path: str) -> dict:
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path!r} is not a directory")
  cfg_path = os.path.join(path, CONFIG)
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{cfg_path!r} is missing: not a transformers checkpoint directory")
  try:
    with open(cfg_path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_path!r} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{cfg_path!r} holds {type(config).__name__}, expected an object")
  return config


def _weight_files(path: str) -> list[str]:
  single = os.path.join(path, WEIGHTS)
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index!r} is not a valid safetensors index: {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise CheckpointError(f"{index!r} lists shard(s) {missing} that are not in {path!r}")
    return [os.path.join(path, f) for f in files]
  if os.path.isfile(single):
    return [single]
  present = sorted(os.listdir(path))
  hint = (" (only PyTorch .bin weights found: re-save with"
          " `save_pretrained(..., safe_serialization=True)`)"
          if any(f.endswith(".bin") for f in present) else "")
  raise CheckpointError(f"no {WEIGHTS} or {INDEX} in {path!r}{hint}; found {present}")


def read_tensors(path: str, only: Sequence[str] | None = None) -> dict[str, np.ndarray | None]:
  """The checkpoint's tensors, by their transformers names; with `only`, every name is
  listed but only those tensors are read (the others are None)."""
  tensors: dict[str, np.ndarray | None] = {}
  for file in _weight_files(path):
    try:
      with safe_open(file, framework="np") as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key) if only is None or key in only else None
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"cannot read safetensors file {file!r} (corrupt or truncated?): {e}") from e
  return tensors


def write_checkpoint(path: str, config: Mapping, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes config.json + model.safetensors without ever half-writing them.

  A new directory is assembled under a temporary name and renamed into place
  when complete. Into an existing directory (which may hold a tokenizer and
  other files that must survive), each file is written to a temporary name
  and moved over the old one: weights first, config last, so a reader never
  sees a config that announces weights not yet there. A stale shard index
  from an earlier save is removed once the new weights are in place.
  """
  path = os.path.abspath(path)
  contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

  def write_weights(file):
    save_file(contiguous, file, metadata={"format": "pt"})

  def write_config(file):
    with open(file, "w", encoding="utf-8") as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)

  if not os.path.exists(path):
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
      write_weights(os.path.join(tmp, WEIGHTS))
      write_config(os.path.join(tmp, CONFIG))
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return
  if not os.path.isdir(path):
    raise CheckpointError(f"cannot save to {path!r}: it exists and is not a directory")
  files.atomic_write(os.path.join(path, WEIGHTS), write_weights)
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        shards = set(json.load(f)["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError):
      shards = set()
    os.remove(index)
    for shard in shards:
      shard_path = os.path.join(path, os.path.basename(shard))
      if shard != WEIGHTS and os.path.isfile(shard_path):
        os.remove(shard_path)
  files.atomic_write(os.path.join(path, CONFIG), write_config)
