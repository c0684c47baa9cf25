"""Device meshes, the shardings of params and batches, and multi-host helpers, in one place.

Parameters carry logical axis names (see `l2s_jax.models.layers.param`);
rules from the config map them onto the mesh axes ("data", "fsdp",
"tensor"). The frozen LLM and the trainable SLM may use different rules, e.g.
a large encoder sharded over fsdp and tensor while the small model is
replicated. Training and evaluation place params with the same rules.

Batches are split over the data-parallel axes ("data", "fsdp"). Two ways in:
  global_batch   training: each process holds its own rows (process-local
                 data), assembled into one global array;
  shard_batch    decoding: every process holds the whole (host) batch, as
                 the decoders' API takes it; rows are padded to a multiple
                 of the data-parallel size and each device gets its slice.
Everything here works the same with one process or several
(`jax.distributed.initialize`), where a mesh spans every process's devices.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
TENSOR = "tensor"  # the axis heads, FFN and vocabulary are split over
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

Rules = Sequence[tuple[str, Any]]

# Typical rules: replicate everything (data parallel only) ...
REPLICATED: Rules = ()
# ... or shard weights over fsdp (the model dimension) and tensor (heads / mlp / vocab).
FSDP_TENSOR: Rules = (
  ("embed", "fsdp"),
  ("embed_llm", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("rel_buckets", None),
  ("positions", None),
)
NAMED_RULES = {"replicated": REPLICATED, "fsdp_tensor": FSDP_TENSOR}


# --- meshes ---------------------------------------------------------------------------------


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh. Sizes must multiply to the device count;
  one size may be -1 (whatever is left)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {sizes} needs one size per axis {MESH_AXES}")
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {named}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh shape {named} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if any(s < 1 for s in sizes) or int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh shape {named} has {int(np.prod(sizes))} devices, but there are {len(devices)}"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def traced_mesh_splits(axis: str) -> bool:
  """Whether the mesh set for the computation being traced (`jax.set_mesh`, as the decoding
  front sets it) splits `axis` over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get(axis, 1) > 1


_ROWS_PINNED = contextvars.ContextVar("rows_pinned", default=False)


@contextlib.contextmanager
def rows_pinned(mesh: Mesh):
  """Trace under `mesh` (`jax.set_mesh`) with the models' residual stream pinned to the
  batch's layout (`constrain_rows`): training, where params split over `fsdp` should be
  gathered for their products and their gradients reduce-scattered. Decoding does not pin
  it: a step then keeps the weights where they lie and moves the (few) rows' activations."""
  token = _ROWS_PINNED.set(True)
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ROWS_PINNED.reset(token)


def constrain_rows(x):
  """`x` [B, ...] laid out as the batch is when traced under `rows_pinned`: rows over the
  data-parallel axes, everything else whole; otherwise `x` as it is. Without it XLA chose,
  in a T5 train step over data x fsdp, to gather activations and gradients of activations
  (15.5 GB a step for T5-large -> T5-small at batch 256 on v5e-8) instead of the params."""
  mesh = jax.sharding.get_abstract_mesh()
  if not _ROWS_PINNED.get() or mesh.empty:
    return x
  rows = tuple(a for a in BATCH_AXES if dict(mesh.shape).get(a, 1) > 1)
  return jax.lax.with_sharding_constraint(x, P(rows or None, *([None] * (x.ndim - 1))))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The data-parallel axes this mesh has (a user's mesh may name only some)."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --- params ---------------------------------------------------------------------------------


def resolve_rules(rules: str | Rules) -> tuple[tuple[str, Any], ...]:
  if isinstance(rules, str):
    if rules not in NAMED_RULES:
      raise ValueError(f"unknown sharding rules {rules!r}; named ones: {sorted(NAMED_RULES)}")
    return tuple(NAMED_RULES[rules])
  return tuple((str(k), v) for k, v in rules)


def _divisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with the mesh axes dropped from dimensions they do not divide (replicated there).

  A vocabulary of 32,003 ids cannot be split in two; jit refuses uneven
  shardings, so such a dimension stays whole on every device.
  """
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules: str | Rules):
  """NamedShardings for a tree of nn.LogicallyPartitioned leaves (abstract is fine)."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, resolve_rules(rules))
  shapes = nn.unbox(boxed_tree)
  return jax.tree.map(
    lambda s, x: NamedSharding(mesh, _divisible(s.spec, x.shape, mesh)), shardings, shapes
  )


def subtree_shardings(
  boxed_tree: dict, mesh: Mesh, rules: Mapping[str, str | Rules], default: str | Rules
):
  """Shardings of a dict of subtrees, each subtree under its own rules (else `default`)."""
  return {k: logical_shardings(v, mesh, rules.get(k, default)) for k, v in boxed_tree.items()}


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, params_sh, mesh):
  """The optimizer state's shardings: each moment like its param, counts replicated."""
  repl = replicated(mesh)
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
    tx, lambda _, s: s, opt_abstract, params_sh, transform_non_params=lambda _: repl
  )


def place(tree, shardings):
  """Puts a tree (host arrays or device arrays) onto `shardings`.

  Host data is taken to be the same on every process: each device receives
  its slice of it, so a param that does not fit one device never lands on
  one whole.
  """

  def put(x, s):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(s, x.ndim):
        return x
      if not x.is_fully_addressable:  # a global array: reshard it
        return jax.jit(lambda a: a, out_shardings=s)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def bytes_per_device(tree) -> dict:
  """Bytes of `tree`'s arrays held by each of this process's devices, and unsharded."""
  held: dict[int, int] = {}
  total = 0
  for x in jax.tree.leaves(tree):
    total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    for shard in x.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + int(shard.data.nbytes)
  values = list(held.values()) or [0]
  return {"max": max(values), "min": min(values), "unsharded": total, "devices": len(held)}


# --- batches --------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh) or None, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles process-local numpy batches into global arrays sharded over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in local_batch.items()
  }


def pad_rows(arrays: dict, multiple: int) -> tuple[dict, int]:
  """Pads every [B, ...] array to a multiple of `multiple` rows with copies of row 0
  (valid inputs, so padded rows run like real ones); returns (arrays, padded B)."""
  if not arrays:
    return arrays, 0
  b = len(next(iter(arrays.values())))
  padded = -(-b // multiple) * multiple
  if padded == b:
    return arrays, b
  fill = lambda x: np.concatenate([x, np.repeat(x[:1], padded - b, axis=0)], axis=0)
  return {k: fill(np.asarray(v)) for k, v in arrays.items()}, padded


def shard_batch(mesh: Mesh, arrays: dict) -> tuple[dict, int]:
  """Host [B, ...] arrays (the same on every process) -> global arrays split over the
  batch axes, padded to a multiple of the data-parallel size; returns (arrays, padded B).
  With one process and no data-parallel axis the host arrays are returned as they are."""
  arrays, padded = pad_rows({k: np.asarray(v) for k, v in arrays.items()}, data_parallel_size(mesh))
  if data_parallel_size(mesh) == 1 and jax.process_count() == 1:
    # Nothing to split: jit copies host arrays to where the params are faster than any
    # explicit placement (~15 us against ~150 us for a few small arrays on CPU).
    return arrays, padded
  out = {}
  for k, v in arrays.items():
    out[k] = jax.make_array_from_callback(
      v.shape, batch_sharding(mesh, v.ndim), lambda index, v=v: v[index]
    )
  return out, padded


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) array as one numpy array, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# --- several processes ----------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
  """Starts JAX's multi-host runtime when the environment describes a cluster.

  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID describe the job explicitly (any cluster, or several
  processes on one machine); L2S_DISTRIBUTED=1 lets JAX detect a TPU pod /
  SLURM / Kubernetes cluster itself. On CPU, processes exchange data through
  gloo. Idempotent; returns whether the runtime is up.
  """
  if jax.distributed.is_initialized():
    return True
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address and os.environ.get("L2S_DISTRIBUTED") != "1":
    return False
  kwargs = {}
  if address:
    try:
      kwargs = dict(
        coordinator_address=address,
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
      )
    except (KeyError, ValueError) as e:
      raise ValueError(
        "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and "
        f"JAX_PROCESS_ID must be integers too ({e!r})"
      ) from e
  if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] in ("cpu", ""):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  if jax.process_index() == 0:
    logging.info(
      "multi-host job: %d processes, %d devices (%d on each)",
      jax.process_count(),
      jax.device_count(),
      jax.local_device_count(),
    )
  return True


def agree_max(values: Sequence[int]) -> np.ndarray:
  """Element-wise maximum of integer vectors over all processes (one collective)."""
  local = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local)).max(axis=0)


def broadcast_json(value):
  """Process 0's JSON-able `value`, on every process (one process: `value` itself)."""
  if jax.process_count() == 1:
    return value
  mine = json.dumps(value, sort_keys=True, default=str).encode()
  size = int(agree_max([len(mine)])[0])
  buf = np.zeros((size,), np.uint8)
  buf[: len(mine)] = np.frombuffer(mine, np.uint8)
  first = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(bytes(first).rstrip(b"\0").decode())


def any_process(flag: bool) -> np.ndarray:
  """The processes (indices) where `flag` holds; the same answer on every process."""
  if jax.process_count() == 1:
    return np.flatnonzero([flag])
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return np.flatnonzero(np.asarray(flags).reshape(-1))
