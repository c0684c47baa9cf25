"""Training checkpoints with orbax: trainable state, data position, config fingerprint.

Each saved step holds three items:
  state  the TrainState (step, trainable params, optimizer state, rng)
  data   the training iterator's position (JSON)
  meta   the config fingerprint it may be resumed under, and the frozen LLM's source
The frozen LLM itself is never written: it is loaded from its own directory.
orbax writes every step under a temporary name and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from l2s_jax import config_schema


class ResumeError(ValueError):
  """A workdir's checkpoint cannot be resumed under this config."""


class TrainCheckpoints:
  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """(state, data position, meta); `abstract_state` carries the target shardings."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def check_resumable(meta: dict, config) -> None:
  """Refuses a checkpoint written under other model/optimizer/data settings."""
  saved = meta.get("fingerprint")
  current = config_schema.resume_fingerprint(config)
  if saved is None:
    raise ResumeError("the checkpoint carries no config fingerprint; refusing to resume")
  diffs = config_schema.diff_fingerprints(saved, current)
  if diffs:
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise ResumeError("the workdir holds a checkpoint of a different config, so it is not "
                      f"resumed (use another workdir, or the original config): {shown}")


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (concrete or abstract) carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
