"""The papers' tasks from TensorFlow Datasets, read from prepared ArrayRecord files.

The data must be prepared beforehand with TFDS's own tool, in the random-
access format, e.g.

  tfds build wmt14_translate/de-en --file_format=array_record --data_dir=DIR

(`tensorflow-datasets` is imported only when a TFDS task is used.)
"""

from __future__ import annotations

import dataclasses

from l2s_jax.data.jsonl import DataError


@dataclasses.dataclass(frozen=True)
class TfdsTask:
  name: str  # TFDS dataset name with config
  prompt_key: str
  target_key: str
  prefix: str
  task_type: str  # "translation" | "summarization" (which metrics)


TASKS = {
  "wmt14_ende": TfdsTask(
    "wmt14_translate/de-en", "en", "de", "translate English to German: ", "translation"
  ),
  "wmt14_enfr": TfdsTask(
    "wmt14_translate/fr-en", "en", "fr", "translate English to French: ", "translation"
  ),
  "wmt16_enro": TfdsTask(
    "wmt16_translate/ro-en", "en", "ro", "translate English to Romanian: ", "translation"
  ),
  "cnn_dailymail": TfdsTask(
    "cnn_dailymail", "article", "highlights", "summarize: ", "summarization"
  ),
  "xsum": TfdsTask("xsum", "document", "summary", "summarize: ", "summarization"),
}


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsSource:
  """Random access to one split of a prepared TFDS task."""

  def __init__(
    self, task: str, split: str, *, data_dir: str | None = None, prefix: str | None = None
  ):
    if task not in TASKS:
      raise DataError(f"unknown TFDS task {task!r}; known: {sorted(TASKS)}")
    self.task = TASKS[task]
    self.prefix = self.task.prefix if prefix is None else prefix
    import tensorflow_datasets as tfds  # noqa: PLC0415 (optional extra [tfds], heavy)

    try:
      self._source = tfds.data_source(self.task.name, split=split, data_dir=data_dir or None)
    except Exception as e:  # TFDS raises several types for "not prepared"
      raise DataError(
        f"TFDS dataset {self.task.name!r} (split {split!r}) is not prepared in "
        f"{data_dir or 'the default data_dir'}: prepare it with `tfds build {self.task.name} "
        f"--file_format=array_record{' --data_dir=' + data_dir if data_dir else ''}` "
        f"({type(e).__name__}: {e})"
      ) from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    return {
      "prompt": self.prefix + _text(record[self.task.prompt_key]),
      "target": _text(record[self.task.target_key]),
    }
