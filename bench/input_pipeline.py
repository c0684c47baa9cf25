"""The input pipeline: host batches per second, and whether the train loop waits on the host.

1. Host throughput. Global batches of 256 and 1024 synthetic translation pairs, a Unigram
   tokenizer trained on the split (T5's kind), LLM-to-SLM features (T5 encoder-decoder SLM,
   prompt/target buckets up to 128), built by `Pipeline.iterator` with data.workers 0 / 1 / 2
   (Grain worker processes): batches per second after the first (the workers' start-up), and
   the host time per example.
2. Overlap. The training loop's host side with a source made slow on purpose (X ms a batch:
   the featurizer sleeps) and a step made slow on purpose (Y ms on the device: a jitted step
   whose callback sleeps). "before" is the loop as it was: the batch built in process when the
   step asks for it (workers 0, prefetch 0), the loss read right after each step. "after" is
   the loop as `train_lib` runs it: the batch built ahead (prefetch, a worker), the metrics
   read one step late (`train_lib.LaggedMetrics`). The loop should come to about X + Y before
   and max(X, Y) after.
3. The workers the paper's setting needs: the host time of one global batch of 256 over the
   v5e-8 train-step estimate of T5-large -> T5-small (docs/benchmarks.md, 58 ms), assuming the
   workers scale (item 1 shows how far they do on this machine).

  python bench/input_pipeline.py [--json out.json] [--batches 12] [--x_ms 40] [--y_ms 40]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp

import common
from l2s_jax import files, sharding
from l2s_jax.config_schema import base_config
from l2s_jax.data import build_pipeline
from l2s_jax.train_lib import LaggedMetrics

V5E_STEP_MS = 58.0  # T5-large -> T5-small train step, batch 256 x 128, v5e-8 (compile.py)


def data_config(workers: int, prefetch: int = 2):
  c = base_config().data
  c.source = "synthetic"
  c.tokenizer = "unigram:8000"
  c.tokenizer_corpus = 5000
  c.workers, c.prefetch = workers, prefetch
  return c


def pipeline(workdir: str, batch: int, workers: int, prefetch: int = 2):
  return build_pipeline(
    data_config(workers, prefetch),
    model_kind="encoder_decoder",
    hybrid=True,
    batch_size=batch,
    workdir=workdir,
  )


def host_rate(workdir: str, batch: int, workers: int, batches: int) -> dict:
  p = pipeline(workdir, batch, workers)
  with p.iterator("train", shuffle=True, repeat=True) as it:
    # The workers' start-up, and the batches they buffered meanwhile: drained, so the timed
    # batches come at the rate they are built.
    for _ in range(1 + 2 * workers * 2):
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - t0
  return {
    "batch": batch,
    "workers": workers,
    "batches_per_s": batches / seconds,
    "us_per_example": seconds / (batches * batch) * 1e6,
    "ms_per_batch": seconds / batches * 1e3,
  }


class SlowFeaturizer:
  """Sleeps `seconds` an example before featurizing (picklable: runs in workers)."""

  def __init__(self, inner, seconds: float):
    self.inner, self.seconds = inner, seconds

  def __call__(self, example, index):
    time.sleep(self.seconds)
    return self.inner(example, index)


def slow_step(y_ms: float):
  """A jitted 'train step' that keeps the device busy for y_ms (a callback that sleeps) and
  returns its metrics, as the real step does."""

  def sleep(x):
    time.sleep(y_ms / 1e3)
    return x

  @jax.jit
  def step(state, batch):
    tokens = jnp.sum(batch["targets_mask"]).astype(jnp.float32)
    tokens = jax.pure_callback(sleep, jax.ShapeDtypeStruct((), jnp.float32), tokens)
    return state + 1, {"loss": tokens * 0.0 + 1.0, "tokens": tokens}

  return step


def slow_pipeline(workdir: str, x_ms: float, after: bool):
  batch = 32
  p = pipeline(workdir, batch, workers=1 if after else 0, prefetch=2 if after else 0)
  p.featurizer = SlowFeaturizer(p.featurizer, x_ms / 1e3 / batch)
  return p


def parts_ms(workdir: str, x_ms: float, y_ms: float, steps: int) -> tuple[float, float]:
  """(ms to build a batch of the slow source, ms of the slow step), each timed alone."""
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  with slow_pipeline(workdir, x_ms, after=False).iterator("train", shuffle=True, repeat=True) as it:
    batch = next(it)
    t0 = time.perf_counter()
    for _ in range(steps // 3):
      next(it)
    x = (time.perf_counter() - t0) / (steps // 3) * 1e3
  step, state = slow_step(y_ms), jnp.zeros((), jnp.int32)
  batch = sharding.global_batch(mesh, batch)
  float(step(state, batch)[1]["loss"])
  t0 = time.perf_counter()
  for _ in range(steps // 3):
    float(step(state, batch)[1]["loss"])
  return x, (time.perf_counter() - t0) / (steps // 3) * 1e3


def loop_ms(workdir: str, x_ms: float, y_ms: float, steps: int, after: bool) -> float:
  """Milliseconds a step of the loop, before (in process, the loss read each step) or after
  (a worker, prefetch 2, metrics one step late)."""
  p = slow_pipeline(workdir, x_ms, after)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  step = slow_step(y_ms)
  state = jnp.zeros((), jnp.int32)
  lagged = LaggedMetrics()
  with p.iterator("train", shuffle=True, repeat=True) as it:
    state, m = step(state, sharding.global_batch(mesh, next(it)))  # compile; workers start
    float(m["loss"])
    time.sleep(0.5)  # the prefetch fills, as it would during the first step's compile
    t0 = time.perf_counter()
    for done in range(1, steps + 1):
      state, metrics = step(state, sharding.global_batch(mesh, next(it)))
      if after:
        lagged.push(done, metrics)
        for _, m in lagged.pop(keep=1):
          float(m["loss"])
      else:
        float(metrics["loss"])
    for _, m in lagged.pop(keep=0):
      float(m["loss"])
    return (time.perf_counter() - t0) / steps * 1e3


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--json", default=None)
  ap.add_argument("--batches", type=int, default=12, help="timed batches per host-rate row")
  ap.add_argument("--x_ms", type=float, default=40.0, help="the slow source: ms a batch")
  ap.add_argument("--y_ms", type=float, default=40.0, help="the slow step: ms a step")
  ap.add_argument("--steps", type=int, default=30)
  args = ap.parse_args()
  out = {"machine": common.machine(), "usable_cores": len(os.sched_getaffinity(0))}
  with tempfile.TemporaryDirectory() as workdir:
    pipeline(workdir, 8, 0)  # trains the tokenizer once, kept in the workdir
    rows = []
    for batch in (256, 1024):
      for workers in (0, 1, 2):
        r = host_rate(workdir, batch, workers, max(args.batches * 256 // batch, 6))
        rows.append(r)
        print(
          f"batch {batch:5d}, workers {workers}: {r['batches_per_s']:7.2f} batches/s, "
          f"{r['ms_per_batch']:7.1f} ms a batch, {r['us_per_example']:6.1f} us an example",
          flush=True,
        )
    out["host"] = rows
    single = next(r for r in rows if r["batch"] == 256 and r["workers"] == 0)
    out["paper_workers"] = {
      "step_ms": V5E_STEP_MS,
      "host_ms_per_batch_one_core": single["ms_per_batch"],
      "workers_needed": math.ceil(single["ms_per_batch"] / V5E_STEP_MS),
    }
    print(
      f"paper setting (batch 256): {single['ms_per_batch']:.1f} ms of host time a batch vs a "
      f"{V5E_STEP_MS:.0f} ms v5e-8 step -> {out['paper_workers']['workers_needed']} worker(s)"
    )
    x, y = parts_ms(workdir, args.x_ms, args.y_ms, args.steps)  # as measured, alone
    before = loop_ms(workdir, args.x_ms, args.y_ms, args.steps, after=False)
    after = loop_ms(workdir, args.x_ms, args.y_ms, args.steps, after=True)
    out["overlap"] = {
      "x_ms_asked": args.x_ms,
      "y_ms_asked": args.y_ms,
      "x_ms": x,
      "y_ms": y,
      "before_ms": before,
      "after_ms": after,
      "before_over_sum": before / (x + y),
      "after_over_max": after / max(x, y),
    }
    print(
      f"loop, source X = {x:.1f} ms a batch, step Y = {y:.1f} ms (each timed alone): before "
      f"{before:.1f} ms a step ({before / (x + y):.2f} x (X+Y)), after {after:.1f} ms "
      f"({after / max(x, y):.2f} x max(X,Y)); {before / after:.2f}x faster"
    )
  print(f"machine: {out['machine']}")
  if args.json:
    files.write_json(args.json, out, indent=2)
  return out


if __name__ == "__main__":
  main()
