"""A tiny in-memory task and configs for the training tests (also run as a script)."""

from __future__ import annotations

import sys
import time

import numpy as np

from l2s_jax import config_schema

VOCAB = 32
PROMPT = 8


# A fixed permutation of the ordinary ids 3..VOCAB-1: the "grammar" of the task.
SUCCESSOR = np.concatenate([np.arange(3), 3 + np.random.RandomState(0).permutation(VOCAB - 3)])


class ChainTask:
  """Deterministic batches whose target is a chain of successors of the prompt's
  last token: y_0 = s(x_last), y_t+1 = s(y_t), then EOS=1. Learnable in a few
  dozen steps by the tiniest models (a bigram), yet the first target token
  depends on the prompt.

  Batch i depends only on (seed, i), so the iterator's state is one integer. `delay`: seconds
  each batch takes to arrive (a slow input pipeline: a run a signal can reach mid-way).
  """

  def __init__(self, seed: int, batch: int, kind: str, delay: float = 0.0):
    self.seed, self.batch, self.kind, self.i, self.delay = seed, batch, kind, 0, delay

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.delay:
      time.sleep(self.delay)
    r = np.random.RandomState(self.seed * 100_003 + self.i)
    self.i += 1
    src = r.randint(3, VOCAB, (self.batch, PROMPT)).astype(np.int32)
    chain = [SUCCESSOR[src[:, -1]]]
    for _ in range(PROMPT - 1):
      chain.append(SUCCESSOR[chain[-1]])
    tgt = np.concatenate([np.stack(chain, 1), np.ones((self.batch, 1), np.int64)], 1)
    tgt = tgt.astype(np.int32)
    if self.kind == "t5":
      return {
        "inputs": src,
        "inputs_mask": np.ones_like(src),
        "targets": tgt,
        "targets_mask": np.ones_like(tgt),
      }
    toks = np.concatenate([src, tgt], 1)
    loss_mask = np.zeros_like(toks)
    loss_mask[:, PROMPT:] = 1
    return {
      "tokens": toks,
      "tokens_mask": np.ones_like(toks),
      "loss_mask": loss_mask,
      "prompt_lengths": np.full((self.batch,), PROMPT, np.int32),
    }

  def get_state(self) -> dict:
    return {"i": self.i}

  def set_state(self, state: dict) -> None:
    self.i = int(state["i"])


def tiny_config(kind: str = "t5", **train):
  c = config_schema.base_config()
  c.llm.preset = "t5-v1_1-small"
  c.llm.overrides = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
  )
  if kind == "t5":
    c.slm.preset = "t5-small"
    c.slm.overrides = dict(
      d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2
    )
  else:
    c.slm.preset = "gpt2"
    c.slm.overrides = dict(n_embd=16, n_layer=1, n_head=2, n_positions=32)
  c.train.batch_size = 8
  c.train.steps = 10
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 5
  c.mesh.data = 1
  c.opt.learning_rate = 3e-3
  c.opt.warmup_steps = 0
  for k, v in train.items():
    c.train[k] = v
  return c


class SlowFeaturizer:
  """A pipeline's featurizer that takes `seconds` an example (a slow input pipeline: a run a
  signal can reach mid-way). Module-level, so Grain's worker processes can unpickle it."""

  def __init__(self, inner, seconds: float):
    self.inner, self.seconds = inner, seconds

  def __call__(self, example: dict, index: int) -> dict:
    time.sleep(self.seconds)
    return self.inner(example, index)


class DyingSource:
  """A pipeline's source whose example `at` ends the process reading it: SIGKILL (a worker
  killed by the system), or a DataError when `error` is set."""

  def __init__(self, inner, at: int, error: bool = False):
    self.inner, self.at, self.error = inner, at, error

  def __len__(self):
    return len(self.inner)

  def __getitem__(self, index):
    if index == self.at:
      if self.error:
        from l2s_jax.data import DataError

        raise DataError(f"example {index}: a bad example")
      import os
      import signal

      os.kill(os.getpid(), signal.SIGKILL)
    return self.inner[index]


def pipeline_config(kind: str = "t5", workers: int = 1, **train):
  """tiny_config on the synthetic task through the real data pipeline (Grain, `workers`)."""
  c = tiny_config(kind, **train)
  c.data.source = "synthetic"
  c.data.synthetic.num_train = 60  # a few epochs in a run
  c.data.max_prompt_len = c.data.max_target_len = 32
  c.data.prompt_buckets = c.data.target_buckets = (16, 32)
  c.data.workers = workers
  return c


def run(
  workdir: str,
  steps: int,
  checkpoint_every: int,
  kind: str = "t5",
  delay: float = 0.0,
  workers: int = 1,
) -> dict:
  """Trains the tiny hybrid on one device through the real data pipeline (Grain, with
  `workers` worker processes); used in-process and by the SIGKILL and SIGTERM tests.
  delay: seconds each batch takes to build (the losses are the same)."""
  import jax

  from l2s_jax import assemble, sharding, train_lib

  c = pipeline_config(kind, workers, steps=steps, checkpoint_every=checkpoint_every)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  run = assemble.for_training(c, workdir, mesh=mesh)
  if delay:
    run.pipeline.featurizer = SlowFeaturizer(run.pipeline.featurizer, delay / c.train.batch_size)
  train_data = run.pipeline.iterator("train", shuffle=True, repeat=True)
  return train_lib.train_run(run, workdir, train_data=train_data)


if __name__ == "__main__":
  # WORKDIR STEPS CHECKPOINT_EVERY [SECONDS_PER_BATCH]
  run(
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    delay=float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
  )
