"""Training: LLM-to-SLM (frozen LLM encoder + projector + SLM) or one plain model.

`train_and_evaluate(config, workdir)` has the run assembled from the config
(`l2s_jax.assemble.for_training`: data, model, initial params on the mesh) and
trains it with `train_run(run, ...)`, on the mesh and param shardings the
assembly chose; `train(...)` takes a model, its params and any iterator of
batches, so tests and other programs can drive it directly.

Sharding follows one recipe: abstract params (`eval_shape`) -> logical
partition specs -> mesh shardings -> params placed / `jit(init, out_shardings)`
-> `jit(train_step, in/out shardings, donated state)`. With several processes
each feeds its own rows of every batch; only process 0 writes logs and
summaries (orbax coordinates the checkpoint writes).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from l2s_jax import assemble, checkpoint, config_fingerprint, config_schema, files, sharding
from l2s_jax.checkpoint import ResumeError, TrainCheckpoints, abstract_like
from l2s_jax.data import DataError
from l2s_jax.lock import WorkdirLock
from l2s_jax.metrics_log import MetricsLog
from l2s_jax.models import count_params
from l2s_jax.optimizer import make_optimizer
from l2s_jax.train_step import TrainState, eval_step, train_step


class Preemption:
  """Whether the job was asked to stop (SIGTERM: a preemption notice, or a user's kill).

  One process: a SIGTERM handler sets a flag, read at the end of each step. Several: JAX's
  preemption service (on since `jax.distributed.initialize`) spreads any process's notice and
  names the step at which every process saves together.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def state_shardings(tx, trainable_abstract, params_sh, mesh) -> TrainState:
  repl = sharding.replicated(mesh)
  return TrainState(
    step=repl,
    params=params_sh,
    opt_state=sharding.opt_state_shardings(tx, trainable_abstract, params_sh, mesh),
  )


def jit_train_step(run: assemble.Assembly, tx, schedule, state_sh, batch_sh):
  """The jitted train step of a run: state donated, everything on its shardings (the one
  definition the training loop runs and `compile_lib` compiles ahead of time)."""
  config = run.config
  step = jax.jit(
    functools.partial(
      train_step,
      model=run.train_model,
      tx=tx,
      grad_accum=config.opt.grad_accum,
      label_smoothing=config.opt.label_smoothing,
      schedule=schedule,
    ),
    in_shardings=(state_sh, run.frozen_shardings, batch_sh),
    out_shardings=(state_sh, None),
    donate_argnums=(0,),
  )
  return _under_mesh(step, run.mesh)


def _under_mesh(jitted, mesh):
  """`jitted`, traced (called, or `.trace`d: lower the trace for a compiler) under
  `sharding.rows_pinned(mesh)`: the models pin their residual stream to the batch's layout."""

  class Pinned:
    def __call__(self, *args):
      with sharding.rows_pinned(mesh):
        return jitted(*args)

    def trace(self, *args):
      with sharding.rows_pinned(mesh):
        return jitted.trace(*args)

  return Pinned()


def jit_eval_step(run: assemble.Assembly):
  """The jitted loss of an evaluation batch (summed NLL and tokens), params as placed."""
  return _under_mesh(jax.jit(functools.partial(eval_step, model=run.compute_model)), run.mesh)


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def train_state_shardings(run: assemble.Assembly, tx) -> TrainState:
  """Where a run's train state lives: params on their shardings, the optimizer state
  mirroring them, the step replicated."""
  return state_shardings(tx, _shapes(run.trainable), run.trainable_shardings, run.mesh)


def abstract_state(run: assemble.Assembly, tx, state_sh) -> TrainState:
  """The train state of a run's trainable params, as ShapeDtypeStructs on `state_sh`."""
  return abstract_like(jax.eval_shape(init_state_fn(tx), _shapes(run.trainable)), state_sh)


def init_state_fn(tx):
  """params -> the TrainState at step 0 (the optimizer's initial state)."""
  return lambda params: TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
  )


def check_resumable(meta: dict, config) -> None:
  """Refuses a checkpoint written under other model/optimizer/data settings."""
  saved = meta.get("fingerprint")
  current = config_fingerprint.resume_fingerprint(config)
  if saved is None:
    raise ResumeError("the checkpoint carries no config fingerprint; refusing to resume")
  diffs = config_fingerprint.diff_fingerprints(
    saved, current, defaults=config_fingerprint.resume_fingerprint(config_schema.base_config())
  )
  if diffs:
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise ResumeError(
      "the workdir holds a checkpoint of a different config, so it is not "
      f"resumed (use another workdir, or the original config): {shown}"
    )


def resume(ckpt: TrainCheckpoints, config, abstract: TrainState):
  """(state, data position) of the newest readable checkpoint, or None for a fresh run.

  A checkpoint whose files are damaged (checked against the inventory sealed when it was
  written) or that orbax cannot read is named, moved aside to checkpoints.unreadable/ (never
  deleted) and the next older one is tried; with none readable, a clear error.
  """
  moved = []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):

    def restore(step):
      check_resumable(ckpt.read_meta(step), config)
      return ckpt.restore(
        step, abstract.params, {"step": abstract.step, "opt_state": abstract.opt_state}
      )

    restored, problem = checkpoint.readable(ckpt, step, restore)
    if problem is None:
      params, opt, data_state = restored
      if moved:
        logging.warning("resuming from step %d, the newest readable checkpoint", step)
      else:
        logging.info("resumed from step %d of %s", step, ckpt.directory)
      return TrainState(step=opt["step"], params=params, opt_state=opt["opt_state"]), data_state
    where = ckpt.move_aside(step) if jax.process_index() == 0 else "(process 0 moves it)"
    logging.warning(
      "checkpoint step %d in %s is unreadable: %s; moved aside to %s",
      step,
      ckpt.directory,
      problem,
      where,
    )
    moved.append(f"step {step} ({problem})")
  if moved:
    raise checkpoint.UnreadableCheckpoint(
      f"no readable checkpoint in {ckpt.directory}: {'; '.join(moved)}. They were moved to "
      f"{ckpt.directory}.unreadable/; remove the workdir's checkpoints to start over"
    )
  return None


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  model,
  frozen,
  trainable,
  train_data,
  eval_data: Callable[[], Iterable[dict]] | None = None,
  mesh=None,
) -> dict:
  """Trains `trainable` of `model` (the frozen params never change) on `mesh` (default
  `config.mesh`) and returns a summary: `train_run` of the params placed by
  `assemble.from_params`."""
  run = assemble.from_params(config, model, frozen=frozen, trainable=trainable, mesh=mesh)
  return train_run(run, workdir, train_data=train_data, eval_data=eval_data)


def train_run(
  run: assemble.Assembly,
  workdir: str,
  *,
  train_data,
  eval_data: Callable[[], Iterable[dict]] | None = None,
) -> dict:
  """Trains an assembled run's trainable params (its frozen ones never change) under its
  config, on its mesh and param shardings, and returns a summary.

  train_data: iterator of process-local numpy batches with get_state()/set_state().
  eval_data: returns a fresh iterable of evaluation batches (process-local too).
  The workdir is locked for the run (a second run on it is refused). On SIGTERM the run
  saves a checkpoint at the current step, data position included, and returns with
  summary["preempted"] True; resuming continues as if it had never stopped.
  """
  os.makedirs(workdir, exist_ok=True)
  lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
  try:
    return _train(run, workdir, train_data=train_data, eval_data=eval_data)
  finally:
    if lock is not None:
      lock.release()


def _train(run: assemble.Assembly, workdir, *, train_data, eval_data) -> dict:
  config, mesh, frozen = run.config, run.mesh, run.frozen
  steps = int(config.train.steps)
  tx, schedule = make_optimizer(config.opt, steps)

  state_sh = train_state_shardings(run, tx)
  init_state = init_state_fn(tx)
  ckpt = TrainCheckpoints(workdir, keep=config.train.keep_checkpoints)
  meta = {
    "fingerprint": config_fingerprint.resume_fingerprint(config),
    "llm_source": config.llm.path or f"preset:{config.llm.preset}",
  }
  abstract = abstract_state(run, tx, state_sh)
  resumed = resume(ckpt, config, abstract)
  if resumed is not None:
    state, data_state = resumed
    train_data.set_state(data_state)
  else:
    state = jax.jit(init_state, out_shardings=state_sh)(run.trainable)

  step_fn = None
  eval_fn = jit_eval_step(run)
  log = MetricsLog(workdir)
  start = int(state.step)
  if jax.process_index() == 0:
    logging.info(
      "training %s params (frozen: %s) from step %d to %d",
      f"{count_params(state.params):,}",
      f"{count_params(frozen):,}",
      start,
      steps,
    )
  preemption = Preemption()
  preempted = False
  progress = tqdm(
    total=steps,
    initial=start,
    desc="train",
    unit="step",
    # None: shown on a terminal only (logs and tests stay clean).
    disable=None if jax.process_index() == 0 else True,
    dynamic_ncols=True,
  )
  lagged = LaggedMetrics()
  window = {"tokens": 0.0, "start": time.perf_counter()}
  last: dict = {}

  def read(done: int, metrics: dict) -> None:
    """One step's metrics, on the host: the NaN stop, progress, the log every log_every."""
    nonlocal last
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      ckpt.wait()
      kept = ckpt.latest_step()
      raise FloatingPointError(
        f"training loss became {loss} at step {done}; stopping. The last good "
        f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is "
        f"kept in {ckpt.directory}"
      )
    window["tokens"] += float(metrics["tokens"])
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}")
    if done % config.train.log_every == 0 or done == steps:
      elapsed = time.perf_counter() - window["start"]
      last = {k: float(v) for k, v in metrics.items()}
      last["loss_tokens_per_s"] = window["tokens"] / max(elapsed, 1e-9)
      log.write(done, last)
      window.update(tokens=0.0, start=time.perf_counter())

  try:
    for step in range(start, steps):
      # Built ahead (the data's workers or thread) while the previous steps run.
      batch = sharding.global_batch(mesh, next(train_data))
      if step_fn is None:
        step_fn = jit_train_step(run, tx, schedule, state_sh, sharding.batch_shardings(mesh, batch))
      state, metrics = step_fn(state, frozen, batch)  # dispatched: the device runs it
      done = step + 1
      lagged.push(done, metrics)
      evaluating = bool(
        eval_data is not None
        and config.train.eval_every
        and (done % config.train.eval_every == 0 or done == steps)
      )
      preempted = preemption.reached(done)
      saving = done % config.train.checkpoint_every == 0 or done == steps or preempted
      # The host reads a step's metrics once the next one is on its way (one step late), and
      # every step's before a checkpoint or an evaluation: a checkpoint never holds a state
      # past a NaN loss.
      for d, m in lagged.pop(keep=0 if saving or evaluating else 1):
        read(d, m)
      if evaluating:
        ev = evaluate_loss(
          eval_fn, state.params, frozen, eval_data(), mesh, config.train.eval_batches
        )
        log.write(done, ev)
        last.update(ev)
      if saving:
        ckpt.save(  # written asynchronously by orbax while the next steps run
          done,
          state.params,
          {"step": state.step, "opt_state": state.opt_state},
          train_data.get_state(),
          meta,
          force=True,
        )
      if preempted:
        ckpt.wait()
        logging.warning(
          "stop requested (SIGTERM): saved step %d in %s; run again to resume", done, ckpt.directory
        )
        break
  finally:
    preemption.close()
    progress.close()
    log.close()
    ckpt.close()
    getattr(train_data, "close", lambda: None)()
  summary = {"step": int(state.step), "workdir": os.path.abspath(workdir), **last}
  if preempted:
    summary["preempted"] = True
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "train_summary.json"), summary, indent=2)
  return summary


def evaluate_loss(eval_fn, params, frozen, batches: Iterable[dict], mesh, max_batches: int) -> dict:
  """Mean loss over the first `max_batches` batches (0: all). The sums stay on the device
  until the end, so the next batch is built while the device runs."""
  nll, tokens = 0.0, 0.0
  try:
    for i, local in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      out = eval_fn(params, frozen, sharding.global_batch(mesh, local))
      nll, tokens = nll + out["nll_sum"], tokens + out["tokens"]
  finally:
    getattr(batches, "close", lambda: None)()
  nll, tokens = float(nll), float(tokens)
  mean = nll / max(tokens, 1.0)
  return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


class LaggedMetrics:
  """Step metrics on the device, read on the host in step order once `keep` newer steps have
  been dispatched after them (one step late): reading never waits for the step just sent."""

  def __init__(self):
    self._pending: collections.deque = collections.deque()

  def push(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def pop(self, keep: int) -> list[tuple[int, dict]]:
    out = []
    while len(self._pending) > keep:
      step, metrics = self._pending.popleft()
      out.append((step, jax.device_get(metrics)))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Assembles the run from `config` and trains; see `train`."""
  run = assemble.for_training(config, workdir)
  pipeline = run.pipeline
  if not pipeline.has_targets("train"):
    raise DataError(
      f"the training split ({config.data.jsonl_train or config.data.source}) "
      "holds prompts without targets: training needs a target per prompt"
    )
  train_iter = pipeline.iterator("train", shuffle=True, repeat=True)
  eval_fn = lambda: pipeline.iterator(config.decode.split, shuffle=False, repeat=False)
  return train_run(run, workdir, train_data=train_iter, eval_data=eval_fn)
