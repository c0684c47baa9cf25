"""Metrics to a JSONL file (machine-readable) and TensorBoard event files.

tensorboardX writes TensorBoard's event format without TensorFlow. Only the
first process writes.
"""

from __future__ import annotations

import json
import math
import os

import jax


class MetricsLog:
  def __init__(self, workdir: str, name: str = "train"):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, f"{name}_metrics.jsonl")
    self._file = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # noqa: PLC0415 (heavy: only process 0 writes events)

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", name))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._file.flush()
    for k, v in clean.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._tb:
      self._tb.close()


def _plain(v):
  try:
    f = float(v)
  except (TypeError, ValueError):
    return v
  return int(f) if f.is_integer() and abs(f) < 2**53 and not isinstance(v, float) else f


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
