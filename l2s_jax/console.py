"""Console output of the command-line programs: our logs, without library chatter."""

from __future__ import annotations

import logging as std_logging

from absl import logging

_QUIET = ("orbax", "etils", "tensorflow", "absl/flags")


class _LibraryFilter(std_logging.Filter):
  """Drops INFO records emitted from libraries' own modules (orbax logs every save step)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(q in record.pathname for q in _QUIET)


def setup_logging() -> None:
  """INFO logs on process 0; the other processes of a multi-host job log warnings only.
  (Call after `jax.distributed.initialize`, when there is one.)"""
  import jax
  logging.use_absl_handler()          # also outside absl.app (python -m l2s_jax.demo)
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
    handler.addFilter(_LibraryFilter())


def print_on_first_process(text: str) -> None:
  """Prints on process 0 only (one line per job, not one per host)."""
  import jax
  if jax.process_index() == 0:
    print(text, flush=True)


def summary_line(report: dict) -> str:
  m = report["metrics"]
  scores = ", ".join(f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, float))
  speed = report["speed"]["batched"]
  return (f"{report['split']} step {report['step']}: {report['examples']} examples, {scores}; "
          f"{speed['generated_tokens_per_s']:.1f} generated tokens/s at batch "
          f"{speed['batch_size']}")
