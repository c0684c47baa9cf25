"""JSONL files (plain or gzip): one {"prompt": ..., "target": ...} object per line.

A file whose lines have no target field at all is a file of prompts alone (generation:
`eval.py` writes predictions and no metric); a file where only some lines lack it is an
error that names the first such line.
"""

from __future__ import annotations

import gzip
import json
import logging
import os


class DataError(ValueError):
  """Input data that cannot be used as asked; the message names file and line."""


class JsonlSource:
  """Random access to the examples of one JSONL file (held in memory).

  prompt_field / target_field: the keys to read. skip_bad_lines: count and
  skip lines that are not JSON objects or lack a field, instead of failing.
  has_targets: False for a file of prompts alone (its examples' target is None).
  """

  def __init__(
    self,
    path: str,
    *,
    prompt_field: str = "prompt",
    target_field: str = "target",
    skip_bad_lines: bool = False,
    prefix: str = "",
  ):
    if not os.path.exists(path):
      raise DataError(f"JSONL file {path!r} does not exist")
    if not os.path.isfile(path):
      raise DataError(f"JSONL path {path!r} is not a file")
    self.path, self.prefix = path, prefix
    self.skipped = 0
    self.has_targets: bool | None = None  # decided by the first usable line
    self._examples: list[tuple[str, str | None]] = []
    opener = gzip.open if path.endswith(".gz") else open
    try:
      with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
          try:
            line = self._text(raw, lineno)
            if not line.strip():
              continue
            self._examples.append(self._parse(line, lineno, prompt_field, target_field))
          except DataError:
            if not skip_bad_lines:
              raise
            self.skipped += 1
    except (OSError, EOFError) as e:
      raise DataError(f"cannot read JSONL file {path!r}: {e}") from e
    if self.skipped:
      logging.warning("%s: skipped %d bad line(s)", path, self.skipped)
    if not self._examples:
      raise DataError(f"JSONL file {path!r} holds no usable examples")

  def _text(self, raw: bytes, lineno: int) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(
        f"{self.path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
      ) from None

  def _parse(self, line, lineno, prompt_field, target_field):
    where = f"{self.path}, line {lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if self.has_targets is None and prompt_field in obj:
      self.has_targets = target_field in obj
    fields = (prompt_field, target_field) if self.has_targets is not False else (prompt_field,)
    for field in fields:
      if field not in obj:
        raise DataError(f"{where}: no field {field!r} (fields: {sorted(obj)})")
      if not isinstance(obj[field], str):
        raise DataError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not text")
    if self.has_targets is False and target_field in obj:
      raise DataError(
        f"{where}: field {target_field!r} here, but the first line has none: "
        "give every line a target, or none (prompts alone)"
      )
    return obj[prompt_field], obj[target_field] if self.has_targets else None

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict:
    prompt, target = self._examples[index]
    return {"prompt": self.prefix + prompt, "target": target}
