"""Training checkpoints with orbax: trainable params, optimizer state, data position, config.

Each saved step holds four items:
  params  the trainable params ({projector, slm}, or a plain model's)
  opt     the optimizer state and the step counter
  data    the training iterator's position (JSON)
  meta    the config fingerprint it may be resumed under, and the frozen LLM's source
Evaluation restores `params` alone: no optimizer is built, `config.opt` does
not matter. The frozen LLM itself is never written: it is loaded from its own
directory. orbax writes every step under a temporary name and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.

Once a step is complete it is sealed: `l2s_files.json` in its directory lists
every file's size and SHA-256, so a checkpoint damaged later (a partial copy, a
bad disk) is named, file by file, before anything tries to read it; a damaged
step can be moved aside (`checkpoints.unreadable/`, never deleted).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from l2s_jax import files

SEAL = "l2s_files.json"


class ResumeError(ValueError):
  """A workdir's checkpoint cannot be resumed under this config."""


class TrainCheckpoints:
  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self._written: set[int] = set()  # saved here, to be sealed once complete
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=async_save
    )
    # Handlers named up front, so a fresh manager reads an item's metadata (shapes)
    # before anything is restored.
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "params": ocp.StandardCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self, step: int, params, opt: dict, data_state: dict, meta: dict, *, force: bool = False
  ) -> bool:
    """opt: {"step": int32 [], "opt_state": optimizer state}. The previous (async) save
    completes and is sealed first."""
    self.wait()
    self._written.add(step)
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt=ocp.args.StandardSave(opt),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_params, abstract_opt) -> tuple[Any, dict, dict]:
    """(params, opt, data position); the abstract trees carry the target shardings."""
    check_shapes(self.param_shapes(step), abstract_params, f"checkpoint step {step}")
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt=ocp.args.StandardRestore(abstract_opt),
        data=ocp.args.JsonRestore(),
      ),
    )
    return out["params"], out["opt"], out["data"]

  def restore_params(self, step: int, abstract_params):
    """The trainable params alone, placed as `abstract_params`' shardings say."""
    check_shapes(self.param_shapes(step), abstract_params, f"checkpoint step {step}")
    out = self.manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    )
    return out["params"]

  def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{param path: shape} as saved, read from the checkpoint's metadata."""
    return saved_shapes(self.manager.item_metadata(step)["params"])

  def wait(self) -> None:
    """Waits for a save in flight, then seals every complete step."""
    self.manager.wait_until_finished()
    self._seal()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # --- integrity ---------------------------------------------------------------------------

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _seal(self) -> None:
    """Seals the steps this object wrote, once complete (never a step found on disk: its
    files may already be damaged)."""
    for step in sorted(self._written):
      self._written.discard(step)
      seal = os.path.join(self.step_dir(step), SEAL)
      if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
        files.write_json(seal, files.inventory(self.step_dir(step), skip=(SEAL,)), indent=1)

  def damage(self, step: int) -> str | None:
    """What is wrong with a step's files (a sentence naming the file), None if they are as
    sealed. A step that was never sealed (killed right after writing it) is not vetted here."""
    seal = os.path.join(self.step_dir(step), SEAL)
    if not os.path.isdir(self.step_dir(step)):
      return f"its directory {self.step_dir(step)} is missing"
    if not os.path.exists(seal):
      return None
    try:
      with open(seal, encoding="utf-8") as f:
        listed = json.load(f)
    except (OSError, ValueError) as e:
      return f"its inventory {SEAL} cannot be read ({e})"
    return files.check_inventory(self.step_dir(step), listed)

  def move_aside(self, step: int) -> str:
    """Moves a step's directory to checkpoints.unreadable/ (kept, not deleted)."""
    dest_root = self.directory + ".unreadable"
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    os.rename(self.step_dir(step), dest)
    self.manager.reload()
    return dest


def first_line(error: BaseException) -> str:
  """An exception's message, first line, bounded (orbax's can run to pages)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) < 300 else text[:300] + "..."


class UnreadableCheckpoint(ValueError):
  """A checkpoint whose files are damaged, or that orbax cannot read."""


def readable(ckpt: TrainCheckpoints, step: int, restore) -> tuple[Any, str | None]:
  """(restore(step), None), or (None, what is wrong) when the step's files are damaged or
  orbax fails to read them. A ResumeError (a config that does not fit) is raised as it is."""
  problem = ckpt.damage(step)
  if problem:
    return None, problem
  try:
    return restore(step), None
  except ResumeError:
    raise
  except Exception as e:  # orbax / TensorStore: a file it cannot decode
    logging.debug("restore of step %d failed", step, exc_info=True)
    return None, f"orbax cannot read it: {first_line(e)}"


def path_name(path) -> str:
  """ "slm/decoder/layers_0/mlp/wo" for a tree_util key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def saved_shapes(metadata) -> dict[str, tuple[int, ...]]:
  """{param path: shape} of an orbax tree's metadata (nothing is read but the metadata)."""
  metadata = getattr(metadata, "item_metadata", metadata)
  tree = getattr(metadata, "tree", metadata)
  return {
    path_name(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
    if hasattr(x, "shape")
  }


def check_shapes(saved: dict[str, tuple[int, ...]], abstract, source: str) -> None:
  """Refuses saved params whose tree or shapes differ from the model the config describes,
  naming the first params that differ and both shapes."""
  want = {
    path_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(abstract)
  }
  problems = []
  for name in sorted(set(want) | set(saved)):
    if name not in saved:
      problems.append(
        f"{name} is missing from {source} (the config's model has it, shape {want[name]})"
      )
    elif name not in want:
      problems.append(f"{name} (shape {saved[name]}) is in {source} but not in the config's model")
    elif want[name] != saved[name]:
      problems.append(
        f"{name} has shape {saved[name]} in {source} but {want[name]} in the config's model"
      )
  if problems:
    more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
    raise ResumeError(
      "the saved params do not fit the configured model (is this the config "
      f"it was trained with?): {'; '.join(problems[:4])}{more}"
    )


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (concrete or abstract) carrying `shardings`."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
