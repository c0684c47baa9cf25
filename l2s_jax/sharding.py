"""Device meshes and the shardings of param trees and batches, in one place.

Parameters carry logical axis names (see `l2s_jax.models.layers.param`);
rules from the config map them onto the mesh axes ("data", "fsdp",
"tensor"). The frozen LLM and the trainable SLM may use different rules, e.g.
a large encoder sharded over fsdp and tensor while the small model is
replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the batch is split over both data-parallel axes

Rules = Sequence[tuple[str, Any]]

# Typical rules: replicate everything (data parallel only) ...
REPLICATED: Rules = ()
# ... or shard weights over fsdp (the model dimension) and tensor (heads / mlp / vocab).
FSDP_TENSOR: Rules = (
    ("embed", "fsdp"), ("embed_llm", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("mlp", "tensor"), ("head_dim", None), ("rel_buckets", None),
    ("positions", None),
)
NAMED_RULES = {"replicated": REPLICATED, "fsdp_tensor": FSDP_TENSOR}


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh. Sizes must multiply to the device count;
  one size may be -1 (whatever is left)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [shape.get(a, 1) for a in MESH_AXES] if isinstance(shape, dict) else list(shape)
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape {sizes} needs one size per axis {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide "
                       f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if any(s < 1 for s in sizes) or int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} "
                     f"devices, but there are {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def resolve_rules(rules: str | Rules) -> tuple[tuple[str, Any], ...]:
  if isinstance(rules, str):
    if rules not in NAMED_RULES:
      raise ValueError(f"unknown sharding rules {rules!r}; named ones: {sorted(NAMED_RULES)}")
    return tuple(NAMED_RULES[rules])
  return tuple((str(k), v) for k, v in rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules: str | Rules):
  """NamedShardings for a tree of nn.LogicallyPartitioned leaves (abstract is fine)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, resolve_rules(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles process-local numpy batches into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)),
                                                    np.asarray(v))
          for k, v in local_batch.items()}


def maybe_initialize_distributed() -> bool:
  """Starts JAX's multi-host runtime when the environment describes a cluster.

  `jax.distributed.initialize()` reads the coordinator address, process
  count and id from the cluster environment (TPU pods, SLURM, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
  """
  import os
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("L2S_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False
