"""One writer per workdir: a training run holds a lock on its workdir.

The lock is an exclusive `flock` on `WORKDIR/.l2s_lock`, a file that also holds the holder's pid,
host and start time. A second run on the same workdir is refused with the holder's pid; the
kernel drops the lock when its holder dies (even by SIGKILL), so a lock file left behind by a
dead run is taken over, and said so. (On a file system without flock, e.g. some NFS setups,
the lock is advisory only.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), ".l2s_lock")
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirInUse(
        f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to "
        "end, or use another workdir"
      ) from None
    previous = _read(fd)
    if previous.get("pid") and previous.get("pid") != os.getpid():
      logging.warning(
        "taking over the lock of %s left by pid %s (no longer running)",
        os.path.dirname(self.path),
        previous["pid"],
      )
    os.ftruncate(fd, 0)
    os.pwrite(
      fd,
      json.dumps(
        {
          "pid": os.getpid(),
          "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
      ).encode(),
      0,
    )
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except OSError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read(fd: int) -> dict:
  try:
    data = os.pread(fd, 4096, 0)
    return json.loads(data.decode()) if data.strip() else {}
  except (OSError, ValueError):
    return {}
