"""Reading and writing transformers checkpoint directories (no torch needed).

A directory written by `save_pretrained` holds `config.json` and either
`model.safetensors` or shards `model-00001-of-0000N.safetensors` listed in
`model.safetensors.index.json` ({"metadata": {"total_size": bytes, ...},
"weight_map": {tensor name: shard file}}).
"""

from __future__ import annotations

import json
import os
import re
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
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {
  "TB": 10**12,
  "GB": 10**9,
  "MB": 10**6,
  "KB": 10**3,
  "TIB": 2**40,
  "GIB": 2**30,
  "MIB": 2**20,
  "KIB": 2**10,
}


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
  hint = (
    " (only PyTorch .bin weights found: re-save with"
    " `save_pretrained(..., safe_serialization=True)`)"
    if any(f.endswith(".bin") for f in present)
    else ""
  )
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
      raise CheckpointError(
        f"cannot read safetensors file {file!r} (corrupt or truncated?): {e}"
      ) from e
  return tensors


def parse_size(size: int | str) -> int:
  """Bytes of a shard size: an int, or "5GB" / "500MB" / "20KB" / "1TB" (powers of 10,
  as transformers and huggingface_hub read them; "1.5GB" too) or "2GiB" / "512MiB" (powers
  of 2)."""
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    n = int(size)
  elif isinstance(size, str):
    text = size.strip()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]i?B)", text, flags=re.IGNORECASE)
    if not match:
      raise ValueError(
        f"max_shard_size {size!r} is not a size: give bytes (an int) or a number "
        "with a unit, e.g. '5GB', '500MB', '2GiB'"
      )
    n = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  else:
    raise ValueError(f"max_shard_size must be an int or a string like '5GB', not {size!r}")
  if n <= 0:
    raise ValueError(f"max_shard_size must be positive, got {size!r}")
  return n


def split_shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  """huggingface_hub's split (what `save_pretrained` uses): tensors in order, a shard closed
  when the next tensor would take it past `max_bytes`; a tensor larger than that on its own."""
  shards: list[dict[str, np.ndarray]] = []
  current: dict[str, np.ndarray] = {}
  size = 0
  for name, t in tensors.items():
    if t.nbytes > max_bytes:
      shards.append({name: t})
      continue
    if current and size + t.nbytes > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = t
    size += t.nbytes
  if current or not shards:
    shards.append(current)
  return shards


def _weight_layout(
  tensors: Mapping[str, np.ndarray], max_shard_size
) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
  """({file name: its tensors}, the index or None for a single file)."""
  shards = split_shards(tensors, parse_size(max_shard_size))
  if len(shards) == 1:
    return {WEIGHTS: shards[0]}, None
  n = len(shards)
  files = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": shard for i, shard in enumerate(shards)}
  index = {
    "metadata": {
      "total_size": int(sum(t.nbytes for t in tensors.values())),
      "total_parameters": int(sum(t.size for t in tensors.values())),
    },
    "weight_map": {name: file for file, shard in files.items() for name in shard},
  }
  return files, index


def _stale_weight_files(path: str, keep: set[str]) -> list[str]:
  """Weight files of an earlier save that the new one does not rewrite: the single file or
  the index, the shards the old index lists, files named like shards."""
  old = {WEIGHTS, INDEX}
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        old |= {os.path.basename(s) for s in json.load(f)["weight_map"].values()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
      pass
  old |= {f for f in os.listdir(path) if SHARD.fullmatch(f)}
  return sorted(f for f in old - keep if os.path.isfile(os.path.join(path, f)))


def write_checkpoint(
  path: str,
  config: Mapping,
  tensors: Mapping[str, np.ndarray],
  *,
  max_shard_size: int | str = "50GB",
) -> None:
  """Writes config.json + model.safetensors (or shards and their index, when the tensors
  exceed `max_shard_size`) without ever half-writing them.

  A new directory is assembled under a temporary name and renamed into place
  when complete. Into an existing directory (which may hold a tokenizer and
  other files that must survive), every file is first written to a temporary
  name; only when all are complete are they moved over the old ones, weights
  first, config last, so a failure mid-write leaves the previous files intact
  and a reader never sees a config that announces weights not yet there.
  Weight files of an earlier save that the new one does not replace (a single
  file turned into shards, or the reverse) are removed before the config moves.
  """
  path = os.path.abspath(path)
  contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  weight_files, index = _weight_layout(contiguous, max_shard_size)

  def weights_writer(shard):
    return lambda file: save_file(shard, file, metadata={"format": "pt"})

  def json_writer(obj):
    def write(file):
      with open(file, "w", encoding="utf-8") as f:
        json.dump(dict(obj), f, indent=2, sort_keys=True)

    return write

  writes = [(name, weights_writer(shard)) for name, shard in weight_files.items()]
  if index is not None:
    writes.append((INDEX, json_writer(index)))
  writes.append((CONFIG, json_writer(config)))

  if not os.path.exists(path):
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
      for name, write in writes:
        write(os.path.join(tmp, name))
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return
  if not os.path.isdir(path):
    raise CheckpointError(f"cannot save to {path!r}: it exists and is not a directory")
  stale = _stale_weight_files(path, {name for name, _ in writes})
  staged = files.stage_all([(os.path.join(path, name), write) for name, write in writes])
  try:
    for tmp, final in staged[:-1]:  # the weights (and their index)
      os.replace(tmp, final)
    for name in stale:  # before the config: it must not announce old weights
      os.remove(os.path.join(path, name))
    os.replace(*staged[-1])  # config.json
  finally:
    files.discard(staged)
