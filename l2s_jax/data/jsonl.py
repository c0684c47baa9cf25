"""JSONL files: one {"prompt": ..., "target": ...} object per line, read by random access.

A plain file is read through a line-offset index (the byte offset and length of every usable
line), built once by one pass that checks every line, and kept as two small files: in the
workdir (`WORKDIR/jsonl_index/`) when there is one, else beside the data file. The index
records the file's size and modification time; a file changed since is indexed again, with a
warning. Examples are then read line by line (`os.pread`), so a file larger than memory can be
trained on, and each Grain worker opens the file itself.

A gzip file cannot be read at a random line: it is read whole into memory, for evaluation
splits; training refuses it and says how to convert it.

A file whose lines have no target field at all is a file of prompts alone (generation:
`eval.py` writes predictions and no metric); a file where only some lines lack it is an
error that names the first such line.
"""

from __future__ import annotations

import array
import gzip
import hashlib
import json
import logging
import os
import tempfile

import numpy as np

from l2s_jax import files

INDEX_VERSION = 1


class DataError(ValueError):
  """Input data that cannot be used as asked; the message names file and line."""


class JsonlSource:
  """Random access to the examples of one JSONL file.

  prompt_field / target_field: the keys to read. skip_bad_lines: count and skip lines that
  are not JSON objects or lack a field, instead of failing. has_targets: False for a file
  of prompts alone (its examples' target is None). index_dir: where the line index is kept
  (default: beside the file). random_access: refuse a gzip file (training reads its
  examples in a shuffled order).
  """

  def __init__(
    self,
    path: str,
    *,
    prompt_field: str = "prompt",
    target_field: str = "target",
    skip_bad_lines: bool = False,
    prefix: str = "",
    index_dir: str | None = None,
    random_access: bool = False,
  ):
    if not os.path.exists(path):
      raise DataError(f"JSONL file {path!r} does not exist")
    if not os.path.isfile(path):
      raise DataError(f"JSONL path {path!r} is not a file")
    self.path, self.prefix = path, prefix
    self.fields = (prompt_field, target_field)
    self.skip_bad_lines = skip_bad_lines
    self.skipped = 0
    self.has_targets: bool | None = None  # decided by the first usable line
    self._lines: list[bytes] | None = None  # a gzip file's usable lines, in memory
    self._index: np.ndarray | None = None  # [N, 2] int64: offset, length of usable lines
    self._fd: int | None = None
    if path.endswith(".gz"):
      if random_access:
        raise DataError(
          f"JSONL file {path!r} is gzip-compressed, which cannot be read at a random line "
          f"as training needs: decompress it (`gunzip -k {path}`) and point data.jsonl_train "
          f"at {path[:-3]!r}"
        )
      self._read_gzip()
    else:
      self.index_path = index_path(path, index_dir)
      self._load_or_build_index()
    if self.skipped:
      logging.warning("%s: skipped %d bad line(s)", path, self.skipped)
    if len(self) == 0:
      raise DataError(f"JSONL file {path!r} holds no usable examples")

  # --- reading the whole file once --------------------------------------------------------

  def _scan(self, lines):
    """Checks (lineno, offset, raw line) of the file; yields the usable lines' (offset, raw)."""
    for lineno, offset, raw in lines:
      try:
        line = self._text(raw, lineno)
        if not line.strip():
          continue
        self._parse(line, f"{self.path}, line {lineno}")
      except DataError:
        if not self.skip_bad_lines:
          raise
        self.skipped += 1
        continue
      yield offset, raw

  @staticmethod
  def _numbered(f):
    offset = 0
    for lineno, raw in enumerate(f, start=1):
      yield lineno, offset, raw
      offset += len(raw)

  def _read_gzip(self) -> None:
    try:
      with gzip.open(self.path, "rb") as f:
        self._lines = [raw for _, raw in self._scan(self._numbered(f))]
    except (OSError, EOFError) as e:
      raise DataError(f"cannot read JSONL file {self.path!r}: {e}") from e

  def _stamp(self) -> dict:
    st = os.stat(self.path)
    return {
      "version": INDEX_VERSION,
      "size": st.st_size,
      "mtime_ns": st.st_mtime_ns,
      "fields": list(self.fields),
      "skip_bad_lines": self.skip_bad_lines,
    }

  def _load_or_build_index(self) -> None:
    stamp, meta_path = self._stamp(), self.index_path + ".json"
    meta = None
    if os.path.exists(meta_path) and os.path.exists(self.index_path + ".npy"):
      try:
        with open(meta_path) as f:
          meta = json.load(f)
      except (OSError, ValueError):
        meta = None
    if meta is not None and all(meta.get(k) == v for k, v in stamp.items()):
      self.has_targets, self.skipped = meta["has_targets"], meta["skipped"]
      self._index = np.load(self.index_path + ".npy", mmap_mode="r")
      return
    if meta is not None and (meta.get("size"), meta.get("mtime_ns")) != (
      stamp["size"],
      stamp["mtime_ns"],
    ):
      logging.warning(
        "JSONL file %s changed since its line index was built (size %s -> %d bytes); "
        "indexing it again",
        self.path,
        meta.get("size"),
        stamp["size"],
      )
    offsets, lengths = array.array("q"), array.array("q")
    try:
      with open(self.path, "rb") as f:
        for offset, raw in self._scan(self._numbered(f)):
          offsets.append(offset)
          lengths.append(len(raw))
    except OSError as e:
      raise DataError(f"cannot read JSONL file {self.path!r}: {e}") from e
    index = np.stack([np.frombuffer(offsets, np.int64), np.frombuffer(lengths, np.int64)], 1)
    if index.size == 0:
      index = np.zeros((0, 2), np.int64)
    if self._stamp() != stamp:
      raise DataError(f"JSONL file {self.path!r} changed while it was being indexed")
    meta = {**stamp, "has_targets": self.has_targets, "skipped": self.skipped}
    try:
      self._write_index(index, meta)
    except OSError as e:  # a read-only data directory, and no workdir
      self.index_path = os.path.join(tempfile.mkdtemp(prefix="l2s_jsonl_index_"), "index")
      logging.warning(
        "cannot keep the line index of %s (%s); using %s", self.path, e, self.index_path
      )
      self._write_index(index, meta)
    self._index = np.load(self.index_path + ".npy", mmap_mode="r")
    logging.info("indexed %d lines of %s: %s.npy", len(index), self.path, self.index_path)

  def _write_index(self, index: np.ndarray, meta: dict) -> None:
    files.atomic_write(self.index_path + ".npy", lambda tmp: _save_npy(tmp, index))
    files.write_json(self.index_path + ".json", {**meta, "lines": len(index)})

  # --- one line ---------------------------------------------------------------------------

  def _text(self, raw: bytes, lineno: int) -> str:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(
        f"{self.path}, line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
      ) from None

  def _parse(self, line: str, where: str):
    """(prompt, target or None) of one line; errors name `where` (file and line)."""
    prompt_field, target_field = self.fields
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

  def _raw(self, index: int) -> bytes:
    if self._lines is not None:
      return self._lines[index]
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    offset, length = (int(v) for v in self._offsets()[index])
    return os.pread(self._fd, length, offset)

  def _offsets(self) -> np.ndarray:
    if self._index is None:  # unpickled in a worker process: map the index there
      self._index = np.load(self.index_path + ".npy", mmap_mode="r")
    return self._index

  def __len__(self) -> int:
    return len(self._lines) if self._lines is not None else len(self._offsets())

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"example {index} of {len(self)} in {self.path}")
    # Every line was checked when the file was read or indexed.
    where = f"{self.path}, example {index} (a line changed since it was read?)"
    prompt, target = self._parse(self._raw(index).decode("utf-8"), where)
    return {"prompt": self.prefix + prompt, "target": target}

  def __getstate__(self):
    # Workers reopen the file and map the index themselves.
    return {**self.__dict__, "_fd": None, "_index": None}

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


def index_path(path: str, index_dir: str | None) -> str:
  """Where the line index of `path` is kept (without its .npy / .json suffixes)."""
  path = os.path.abspath(path)
  if index_dir:
    key = hashlib.sha1(path.encode()).hexdigest()[:12]
    return os.path.join(index_dir, f"{os.path.basename(path)}.{key}.l2s-index")
  return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.l2s-index")


def _save_npy(tmp: str, index: np.ndarray) -> None:
  with open(tmp, "wb") as f:
    np.save(f, index)
