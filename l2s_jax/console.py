"""Console output of the command-line programs: our logs, without library chatter, and user
errors as one line.

Importing this module (the commands do so first) quiets transformers' advice about PyTorch
("PyTorch was not found. Models won't be available..."), which does not concern a JAX user:
we use transformers for tokenizers only.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

import jax
from absl import flags, logging

from l2s_jax.lock import WorkdirInUse

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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
  if not flags.FLAGS.is_parsed():  # argparse commands: absl would warn "before flag parsing"
    flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()  # also outside absl.app (python -m l2s_jax.demo)
  logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryFilter) for f in handler.filters):
    handler.addFilter(_LibraryFilter())


def user_error_types() -> tuple[type, ...]:
  """What a user's input can cause: bad config values and paths, unreadable data, files or
  checkpoints, a workdir in use, a full disk."""
  return (ValueError, OSError, WorkdirInUse)


@contextlib.contextmanager
def user_errors(debug: bool = False):
  """Turns a user error into one line on stderr and exit status 1; with `debug` (or
  L2S_DEBUG=1) the traceback is shown instead."""
  try:
    yield
  except user_error_types() as e:
    if debug or os.environ.get("L2S_DEBUG") == "1":
      raise
    message = " ".join(str(e).split()) or type(e).__name__
    print(
      f"error: {message} ({type(e).__name__}; --debug shows the traceback)",
      file=sys.stderr,
      flush=True,
    )
    raise SystemExit(1) from None


def print_on_first_process(text: str) -> None:
  """Prints on process 0 only (one line per job, not one per host)."""
  if jax.process_index() == 0:
    print(text, flush=True)


STAT_LABELS = (
  ("acceptance_rate", "acceptance {:.3f}"),
  ("tokens_per_large_call", "{:.2f} tokens per large-model call"),
  ("large_call_rate", "large-model call rate {:.3f}"),
  ("collaboration_frequency", "collaboration frequency {:.3f}"),
)


def summary_line(report: dict) -> str:
  m = report["metrics"]
  scores = (
    ", ".join(f"{k}={v:.2f}" for k, v in m.items() if isinstance(v, float))
    if report.get("references", True)
    else "no references (predictions only)"
  )
  speed = report["speed"]["batched"]
  stats = speed.get("method_stats", {})
  shown = "".join(f", {label.format(stats[k])}" for k, label in STAT_LABELS if k in stats)
  return (
    f"{report['split']} step {report['step']} ({report['decode']['method']}): "
    f"{report['examples']} examples, {scores}; {speed['generated_tokens_per_s']:.1f} "
    f"generated tokens/s at batch {speed['batch_size']}{shown}"
  )
