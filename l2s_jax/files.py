"""Files written whole or not at all, and inventories that tell a damaged directory.

Everything the project writes for a user to keep (eval results, exports, transformers
directories, summaries) is written to a temporary name beside its destination and renamed
over it when complete: a full disk, a kill or a crash mid-write leaves the previous version
(or nothing) in place, never half a file. Inventories (`inventory`, `check_inventory`) list
each file's size and SHA-256, so a truncated or altered file is named before anything reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Sequence


def atomic_write(final: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp_path) on a temporary file beside `final`, then renames it onto `final`."""
  directory = os.path.dirname(os.path.abspath(final))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.tmp-", dir=directory)
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def stage_all(writes: Sequence[tuple[str, Callable[[str], None]]]) -> list[tuple[str, str]]:
  """The first half of atomic_write for files that belong together: each write(tmp_path)
  goes to a temporary name beside its final. Returns the (temporary, final) pairs, for the
  caller to os.replace in the order it needs once all are complete; a failure removes the
  temporaries and re-raises, leaving every final as it was."""
  staged: list[tuple[str, str]] = []
  try:
    for final, write in writes:
      directory = os.path.dirname(os.path.abspath(final))
      os.makedirs(directory, exist_ok=True)
      fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.tmp-", dir=directory)
      os.close(fd)
      staged.append((tmp, final))
      write(tmp)
  except BaseException:
    discard(staged)
    raise
  return staged


def discard(staged: Sequence[tuple[str, str]]) -> None:
  """Removes the temporaries of `stage_all` that were not moved onto their finals."""
  for tmp, _ in staged:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(final: str, text: str) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  atomic_write(final, write)


def write_json(final: str, obj, **dump_kwargs) -> None:
  write_text(final, json.dumps(obj, **dump_kwargs))


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def inventory(root: str, skip: tuple[str, ...] = ()) -> dict[str, dict]:
  """{relative path: {bytes, sha256}} of every file under `root` but those in `skip`."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in sorted(names):
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, root)
      if rel not in skip:
        out[rel] = {"bytes": os.path.getsize(full), "sha256": sha256(full)}
  return out


def check_inventory(root: str, listed: dict[str, dict]) -> str | None:
  """The first file of `listed` that is missing, truncated or altered under `root` (a
  sentence naming it), or None when every one is as listed."""
  for rel, info in sorted(listed.items()):
    full = os.path.join(root, rel)
    if not os.path.isfile(full):
      return f"file {rel} is missing"
    size = os.path.getsize(full)
    if size != info["bytes"]:
      return f"file {rel} has {size} bytes, {info['bytes']} were written (truncated or replaced)"
    if sha256(full) != info["sha256"]:
      return f"file {rel} fails its checksum (corrupt or altered)"
  return None
