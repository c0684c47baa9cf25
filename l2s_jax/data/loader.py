"""Batches of one split through Grain: deterministic order, per-process rows, worker processes.

The order is Grain's (`grain.MapDataset`): the split's indices, shuffled by `data.seed` and
the epoch (Grain reseeds each epoch: seed + epoch), repeated for training, cut into *global*
batches of batch_size x P indices when P processes share the work. Process p builds rows
p*b .. (p+1)*b - 1 of each global batch (featurize + pad, `batching`), so the processes'
batches, stacked in process order, are exactly the batch one process would see, and a
position counted in global batches holds under any process count or worker count.

Building runs in `workers` Grain worker processes (0: in this process), `prefetch` batches
ahead (a background thread when there are no workers), so the next batch is being built
while the device runs the step. With several processes the padded widths are agreed last, in
this process (a collective: `agree_lengths`), by widening each process's arrays to the
largest bucket of any.

The state saved in a checkpoint is {"version": 2, "batches": global batches consumed, "seed"}:
a resumed iterator is rebuilt from that batch on (Grain's random access), so it sees exactly
the batches an uninterrupted one would, whatever the workers and processes.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

import numpy as np

from l2s_jax.data.jsonl import DataError

STATE_VERSION = 2


class WorkerError(RuntimeError):
  """A data worker process died (killed, out of memory, a crash in native code)."""


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def capped_workers(workers: int) -> int:
  """`data.workers`, within [0, the cores this process may use], with a warning if capped."""
  cores = usable_cores()
  if workers < 0:
    logging.warning("data.workers=%d is negative; using 0 (batches built in process)", workers)
    return 0
  if workers > cores:
    logging.warning(
      "data.workers=%d is more than the %d cores this process may use; using %d",
      workers,
      cores,
      cores,
    )
    return cores
  return workers


class BuildRows:
  """Global batch of indices -> this process's padded rows (picklable: runs in workers)."""

  def __init__(self, source, featurize, pad, batch_size: int, process_index: int):
    self.source, self.featurize, self.pad = source, featurize, pad
    self.batch_size, self.process_index = batch_size, process_index

  def __call__(self, indices: np.ndarray) -> tuple[dict, dict]:
    """(arrays, {feature: longest sequence of these rows})."""
    b, p = self.batch_size, self.process_index
    mine = [int(i) for i in indices[p * b : (p + 1) * b]]
    feats = [self.featurize(self.source[i], i) for i in mine]
    lengths = self.pad.lengths(feats)
    return self.pad(feats, b, lengths), lengths


def _worker_init(index: int, count: int) -> None:
  """In each worker process: a stop signal is the training process's to handle (it saves a
  checkpoint, then stops its workers itself), even when a scheduler signals the whole group."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _grain():
  import grain  # noqa: PLC0415 (loaded with the data, not with the package)
  from absl import flags  # noqa: PLC0415

  # Grain's worker processes read absl flags, which a program without absl.app (a test, a
  # notebook) never parses; the defaults are what it needs.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return grain


class Batches:
  """Deterministic batches of one split, resumable from `get_state()`.

  With `repeat`, batches run on across epochs; without it the last batch is filled with
  padding rows (example_index -1) and iteration ends, on every process at the same batch.
  Call `close()` (or use it as a context manager) to stop its workers.
  """

  def __init__(
    self,
    source,
    featurize: Callable[[dict, int], dict],
    pad,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int = 0,
    agree_lengths: Callable[[dict], dict] | None = None,
    workers: int = 0,
    prefetch: int = 2,
    name: str = "data",
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if prefetch < 0:
      raise ValueError(f"data.prefetch={prefetch} must be >= 0")
    if not 0 <= seed < 2**32:
      raise DataError(f"data.seed={seed} must be in [0, 2**32)")
    self.size = len(source) if not max_examples else min(max_examples, len(source))
    if self.size == 0:
      raise DataError(f"{name}: the split holds no examples")
    self.seed, self.shuffle, self.repeat, self.name = seed, shuffle, repeat, name
    self.batch_size, self.process_count = batch_size, process_count
    self.pad, self.agree_lengths = pad, agree_lengths
    self.workers, self.prefetch = capped_workers(workers), prefetch
    self._build = BuildRows(source, featurize, pad, batch_size, process_index)
    self.batches = 0  # global batches handed out
    self._it = None

  def _dataset(self):
    grain = _grain()
    ds = grain.MapDataset.range(self.size)
    if self.shuffle:
      ds = ds.seed(self.seed).shuffle()
    if self.repeat:
      ds = ds.repeat(None)
    ds = ds.batch(self.batch_size * self.process_count, drop_remainder=False)
    ds = ds[self.batches :].map(self._build)
    if self.workers:
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      return ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=max(self.prefetch, 1)
        ),
        worker_init_fn=_worker_init,
      )
    threads = 1 if self.prefetch else 0
    return ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self.prefetch)
    )

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = iter(self._dataset())
    try:
      arrays, lengths = next(self._it)
    except StopIteration:
      self.close()
      raise
    except RuntimeError as e:
      if "terminated unexpectedly" not in str(e):
        raise
      self.close()
      raise WorkerError(
        f"{self.name}: a data worker process died while building global batch "
        f"{self.batches} ({e}); run with data.workers=0 to see the error in this process"
      ) from e
    self.batches += 1
    if self.agree_lengths is not None:
      arrays = self.pad.widen(arrays, self.agree_lengths(lengths))
    return arrays

  def close(self) -> None:
    if self._it is not None:
      close = getattr(self._it, "close", None)
      self._it = None
      if close is not None:
        close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 (interpreter shutdown: Grain's modules may be gone)
      pass

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "batches": self.batches, "seed": self.seed}

  def set_state(self, state: dict) -> None:
    """Continues after the batches `state` counts. A position written before Grain carried
    the data (no "version") cannot be continued: the data starts again, with a warning."""
    if state.get("version") != STATE_VERSION:
      logging.warning(
        "%s: the checkpoint's data position %s was written by an older l2s-jax (before its "
        "Grain pipeline), whose order this version cannot continue: the data starts again "
        "from its first batch (the model and optimizer state are resumed as saved)",
        self.name,
        state,
      )
      state = {"batches": 0, "seed": self.seed}
    if state["seed"] != self.seed:
      raise ValueError(f"iterator state has seed={state['seed']}, this iterator {self.seed}")
    self.close()
    self.batches = int(state["batches"])
