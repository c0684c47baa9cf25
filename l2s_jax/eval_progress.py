"""Resumable evaluation: decoded batches are kept on disk as they finish.

`EVAL_DIR/<name>.progress.jsonl` starts with the fingerprint of what is being decoded (config,
checkpoint step, split, batch size); each later line is one finished batch: its rows
(index, prompt, reference, hypothesis, generated length), its per-row method statistics and its
seconds, written and flushed before the next batch starts. A rerun with the same fingerprint
takes those batches back and decodes only the rest; a different fingerprint starts over. A line
cut short by a kill is dropped (that batch is decoded again). The file is removed once the final
results are written. Only process 0 writes it; with several processes, process 0's count of
finished batches is shared with the others, so that every process skips the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import jax

from l2s_jax import sharding


def fingerprint(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class ProgressLog:
  def __init__(self, path: str, settings: dict):
    self.path, self.key = path, fingerprint(settings)
    self.restored: list[dict] = []
    self._file = None
    if jax.process_index() == 0:
      self.restored = self._read()
      os.makedirs(os.path.dirname(path), exist_ok=True)
      mode = "a" if self.restored else "w"
      self._file = open(path, mode, encoding="utf-8")
      if mode == "w":
        self._write({"fingerprint": self.key})
    self.restored = sharding.broadcast_json(self.restored)  # every process skips alike
    if self.restored:
      logging.info(
        "resuming evaluation: %d finished batch(es) taken from %s", len(self.restored), path
      )

  def _read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path, encoding="utf-8") as f:
      lines = f.read().split("\n")
    try:
      header = json.loads(lines[0])
    except (json.JSONDecodeError, IndexError):
      header = {}
    if header.get("fingerprint") != self.key:
      logging.warning("%s was written for other settings; decoding from the start", self.path)
      return []
    for line in lines[1:]:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break  # cut short by a kill: decode it again
    # Keep the file to exactly the lines taken (a torn last line would corrupt the next).
    with open(self.path, "w", encoding="utf-8") as f:
      f.write(
        "\n".join(
          [json.dumps({"fingerprint": self.key})]
          + [json.dumps(r, ensure_ascii=False) for r in records]
        )
        + "\n"
      )
    return records

  def _write(self, record: dict) -> None:
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def append(self, record: dict) -> None:
    if self._file is not None:
      self._write(record)

  def close(self, *, finished: bool) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
      if finished:
        os.remove(self.path)
