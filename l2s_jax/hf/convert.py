"""Tensor-by-tensor mapping between transformers state dicts and param trees.

Each family lists `Rule`s: one transformers key <-> one leaf of our tree,
with the layout change between them. Kernels are input-major in l2s_jax
(a query projection is [D, N, H]); torch's `nn.Linear` stores [out, in],
GPT-2's `Conv1D` stores [in, out].
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from l2s_jax.hf.io import CheckpointError

COPY = "copy"  # same shape on both sides
LINEAR = "linear"  # torch Linear [out, in] -> ours [in..., out...]: transpose, reshape
RESHAPE = "reshape"  # already input-major (Conv1D, biases): reshape only


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_key: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  our_shape: tuple[int, ...]
  layout: str = COPY

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.layout == LINEAR:
      return w.T.reshape(self.our_shape)
    return w.reshape(self.our_shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.layout == LINEAR:
      return w.reshape(self.hf_shape[1], self.hf_shape[0]).T
    return w.reshape(self.hf_shape)


def linear(hf_key, path, out_features, in_features, our_shape) -> Rule:
  return Rule(hf_key, tuple(path), (out_features, in_features), tuple(our_shape), LINEAR)


def copy(hf_key, path, shape) -> Rule:
  return Rule(hf_key, tuple(path), tuple(shape), tuple(shape), COPY)


def reshape(hf_key, path, hf_shape, our_shape) -> Rule:
  return Rule(hf_key, tuple(path), tuple(hf_shape), tuple(our_shape), RESHAPE)


def _set(tree: dict, path: Sequence[str], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
  for name in path:
    tree = tree[name]
  return tree


def tensors_to_params(
  tensors: Mapping[str, np.ndarray],
  rules: Iterable[Rule],
  *,
  dtype,
  ignore: Sequence[str] = (),
  source: str = "checkpoint",
) -> dict:
  """Builds the param tree; every rule's tensor must exist with its shape."""
  params: dict = {}
  used = set()
  for rule in rules:
    if rule.hf_key not in tensors:
      raise CheckpointError(
        f"{source}: tensor {rule.hf_key!r} is missing (expected shape {rule.hf_shape})"
      )
    w = tensors[rule.hf_key]
    if tuple(w.shape) != rule.hf_shape:
      raise CheckpointError(
        f"{source}: tensor {rule.hf_key!r} has shape {tuple(w.shape)}, "
        f"but the config implies {rule.hf_shape}"
      )
    _set(params, rule.path, np.asarray(rule.to_ours(w), dtype=dtype))
    used.add(rule.hf_key)
  patterns = [re.compile(p) for p in ignore]
  unused = sorted(k for k in tensors if k not in used and not any(p.fullmatch(k) for p in patterns))
  if unused:
    logging.warning(
      "%s: ignoring %d tensor(s) the model does not use: %s", source, len(unused), unused[:10]
    )
  return params


def params_to_tensors(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  out = {}
  for rule in rules:
    w = np.asarray(_get(params, rule.path))
    if tuple(w.shape) != rule.our_shape:
      raise ValueError(
        f"param {'/'.join(rule.path)} has shape {w.shape}, expected {rule.our_shape}"
      )
    out[rule.hf_key] = np.ascontiguousarray(rule.to_hf(w))
  return out
