"""Programs compiled ahead of time for TPU slices this machine does not have.

libtpu describes a TPU slice (`jax.experimental.topologies`) without touching hardware; a
program lowered from shapes alone over a mesh of those devices compiles as it would on
the slice, and the compiled program tells what it needs per chip:

  devices = topology_devices("v5e:2x4")          # 8 chips, from libtpu alone
  compiled = jax.jit(f).lower(*shape_dtype_structs).compile()
  report = analyze(compiled, chip_of(devices))   # memory, FLOPs, collectives, a roofline

Collectives are counted where they run: the program's call graph is walked from its
entry, and each `while` loop's body (a decoding step) is counted on its own, apart from
the code outside every loop (the prefill). `cost_analysis()` counts a loop's body once,
whatever its trip count: a decoder's step is compiled on its own (`compile_lib`), and a
program that loops over its bulk (micro-batches, a scanned layer stack) has its matrix
products counted through every trip on the traced program (`jaxpr_flops`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

from jax.extend import core as jax_core

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v6e:2x2", "v6e:4x4")
INSTALL = 'pip install "jax[tpu]==<the installed jax version>" (it adds the matching libtpu)'


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation (Google Cloud TPU documentation)."""

  name: str
  peak_bf16_flops: float  # FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # bidirectional inter-chip interconnect, per chip
  source: str


GIB = 2.0**30
# Peak bf16 FLOP/s, HBM capacity and bandwidth, and ICI bandwidth per chip as each
# generation's page states them (v4: "2400 Gbps" interchip interconnect, taken as 300 GB/s;
# the others give a bidirectional figure in GB/s).
CHIPS = {
  "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 300e9, "https://cloud.google.com/tpu/docs/v4"),
  "v5e": Chip("v5e", 197e12, 16e9, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
  "v5p": Chip(
    "v5p", 459e12, 95 * GIB, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p-training"
  ),
  "v6e": Chip("v6e", 918e12, 32e9, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}


def topology_devices(name: str):
  """The devices of the TPU slice `name` ("v5e:2x4", "v4:2x2x1", ...), described by libtpu."""
  # Compiling only: no chip is held, so processes need not take libtpu's lock in turn,
  # and there is no metadata server to ask.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    import libtpu  # noqa: F401, PLC0415 (optional: only ahead-of-time TPU compiles need it)
  except ImportError:
    raise ValueError(f"compiling for a TPU topology needs libtpu: {INSTALL}") from None
  if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", name):
    raise ValueError(
      f"unknown TPU topology {name!r}: a generation and a chip grid, e.g. "
      f"{', '.join(EXAMPLE_TOPOLOGIES)}"
    )
  with _quiet_stderr():  # libtpu's warnings about the TPU_* variables of a real slice
    from jax.experimental import topologies  # noqa: PLC0415 (loads the TPU plugin)

    try:
      return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # libtpu's errors for a name it does not know
      raise ValueError(
        f"libtpu does not know the TPU topology {name!r} ({' '.join(str(e).split())[:200]}); "
        f"valid names look like {', '.join(EXAMPLE_TOPOLOGIES)}"
      ) from e


@contextlib.contextmanager
def _quiet_stderr():
  """Process-level stderr (fd 2, where libtpu's C++ logs go) into a temporary file, given
  back unless the block succeeds: libtpu warns that no TPU_* variables describe a real
  slice, which is expected when only compiling."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as log:
    os.dup2(log.fileno(), 2)
    ok = False
    try:
      yield
      ok = True
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      if not ok:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace"))


def chip_of(name: str) -> Chip:
  """The chip figures of a topology name's generation ("v5e:2x4" -> v5e; "v5" is v5p)."""
  generation = name.split(":")[0].lower()
  generation = {"v5": "v5p", "v5litepod": "v5e", "v6": "v6e"}.get(generation, generation)
  if generation not in CHIPS:
    raise ValueError(f"no chip figures for {name!r}: known generations {sorted(CHIPS)}")
  return CHIPS[generation]


def per_device(chip: Chip, devices) -> Chip:
  """The figures of one device of `devices`: a chip's, or a share of them where libtpu
  describes each TensorCore as a device (v4: two per chip, each half the chip's compute,
  HBM and bandwidth)."""
  cores = len(devices) // len({tuple(d.coords) for d in devices})
  if cores == 1:
    return chip
  return dataclasses.replace(
    chip,
    name=f"{chip.name} TensorCore (1 of {cores} per chip)",
    peak_bf16_flops=chip.peak_bf16_flops / cores,
    hbm_bytes=chip.hbm_bytes / cores,
    hbm_bytes_per_s=chip.hbm_bytes_per_s / cores,
    ici_bytes_per_s=chip.ici_bytes_per_s / cores,
  )


# --- the optimized HLO: computations, calls, collectives ---------------------------------

_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(
  r"\b(?:body|condition|to_apply|calls|branch_computations|true_computation|"
  r"false_computation)=\{?([%\w.\-, ]+)\}?"
)
# A result shape: an array, or a tuple (whose long ones carry /*index=N*/ comments).
_OP = re.compile(
  r"= (\(?(?:[^=]|/\*index=\d+\*/)*?\)?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  comps, current, entry = {}, None, None
  for line in hlo.splitlines():
    head = _HEAD.match(line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO result shape (a tuple's parts added: collectives are combined)."""
  return sum(array_bytes(shape))


def array_bytes(shape: str) -> list[int]:
  """Bytes of each array of an HLO result shape (one, or a tuple's parts)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _BYTES[dtype])
  return out


@dataclasses.dataclass
class Collectives:
  """Collectives by kind: how many, and the bytes of their results (per chip)."""

  count: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  shapes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, kind: str, shape: str) -> None:
    self.count[kind] += 1
    self.bytes[kind] += shape_bytes(shape)
    self.shapes[kind].append(shape.split("{")[0])

  def as_dict(self) -> dict:
    return {k: {"count": self.count[k], "bytes": self.bytes[k]} for k in sorted(self.count)}


def _walk(comps: dict, root: str, *, into_loops: bool) -> tuple[Collectives, list[str]]:
  """(collectives of the code reachable from `root`, the while bodies it stepped over). Not
  `into_loops`: a while loop's condition is followed, its body only named."""
  out, bodies, seen, stack = Collectives(), [], set(), [root]
  while stack:
    name = stack.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    # XLA:TPU writes a reduce-scatter as a fusion of an all-reduce and each device's slice.
    scatter = name.startswith("all-reduce-scatter")
    for line in comps[name]:
      op = _OP.search(line)
      if op:
        kind = op.group(2)
        out.add("reduce-scatter" if scatter and kind == "all-reduce" else kind, op.group(1))
      if " while(" in line and not into_loops:
        bodies.append(re.search(r"body=%?([\w.\-]+)", line).group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", line)
        stack += [cond.group(1)] if cond else []
        continue
      for called in _CALLS.findall(line):
        stack += [c.strip().lstrip("%") for c in called.split(",")]
  return out, bodies


def collectives(hlo: str) -> dict:
  """{"outside_loops": Collectives, "loops": [Collectives of each while body]}, walked from
  the entry computation; a loop inside a loop's body counts with the body."""
  comps, entry = computations(hlo)
  outside, bodies = _walk(comps, entry, into_loops=False)
  return {
    "outside_loops": outside,
    "loops": [_walk(comps, b, into_loops=True)[0] for b in bodies],
  }


_CONSTANT = re.compile(r"%([\w.\-]+) = [su]\d+\[\]\S* constant\((\d+)\)")


def trip_count(comps: dict, cond: str) -> int | None:
  """A `while` loop's trip count when its condition is `i < N` for a constant N, as XLA
  writes its counted loops (a scan's, a windowed einsum's; they count from 0); None when N
  is a runtime value (a decoding loop, which stops when every row is done)."""
  lines = comps.get(cond, [])
  constants = dict(_CONSTANT.findall("\n".join(lines)))
  for line in lines:
    if "ROOT" in line and " compare(" in line and "direction=LT" in line:
      operands = re.findall(r"%([\w.\-]+)", line.split(" compare(", 1)[1].split(")", 1)[0])
      if operands and operands[-1] in constants:
        return int(constants[operands[-1]])
  return None


def collective_bytes_per_run(hlo: str) -> float:
  """Bytes of every collective one run of the program moves per chip: a loop's body counted
  `trip_count` times (once when the count is a runtime value), a computation called from
  several places counted at each call."""
  comps, entry = computations(hlo)
  totals: dict[str, float] = {}

  def total(name: str) -> float:
    if name not in totals:
      totals[name] = 0.0  # a cycle (none in HLO) would count once
      out = 0.0
      for line in comps.get(name, []):
        op = _OP.search(line)
        if op:
          out += shape_bytes(op.group(1))
        if " while(" in line:
          body = re.search(r"body=%?([\w.\-]+)", line).group(1)
          cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
          out += (trip_count(comps, cond) or 1) * total(body) + total(cond)
          continue
        for called in _CALLS.findall(line):
          out += sum(total(c.strip().lstrip("%")) for c in called.split(","))
      totals[name] = out
    return totals[name]

  return total(entry)


# --- matrix-product FLOPs with every loop's trip count ---------------------------------------


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of the matrix products (`dot_general`: 2 x output elements x contracted size) of a
  traced program, the whole program's (global, not per chip). A `scan`'s body counts
  `length` times (the layers of a scanned stack, micro-batches, query blocks of attention);
  a `cond` counts its costliest branch; a `while_loop`'s body once (its trip count is a
  runtime value). XLA's `cost_analysis()` counts every loop's body once, so a program that
  loops over its layers needs this count for its time."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
      continue
    counts = [jaxpr_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
    if name == "scan":
      total += eqn.params["length"] * sum(counts)
    elif name == "cond":
      total += max(counts, default=0.0)
    else:
      total += sum(counts)
  return total


# --- a compiled program's report ----------------------------------------------------------


def memory(compiled) -> dict:
  """Per-chip bytes of a compiled program (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  out = {
    "arguments": int(m.argument_size_in_bytes),
    "outputs": int(m.output_size_in_bytes),
    "temporaries": int(m.temp_size_in_bytes),
    "aliased": int(m.alias_size_in_bytes),
  }
  out["total"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def roofline_s(flops: float, hbm_bytes: float, ici_bytes: float, chip: Chip) -> float:
  """max(FLOPs / peak, bytes / HBM bandwidth) + collective bytes / ICI bandwidth."""
  return (
    max(flops / chip.peak_bf16_flops, hbm_bytes / chip.hbm_bytes_per_s)
    + ici_bytes / chip.ici_bytes_per_s
  )


def analyze(compiled, chip: Chip, *, loop_flops: float | None = None) -> dict:
  """Memory per chip against the chip's HBM, XLA's cost counts, collectives outside and
  inside loops, and a roofline estimate of the whole program as counted.

  loop_flops: the program's matrix-product FLOPs per chip with each loop's trip count
  (`jaxpr_flops` / chips), for a program whose loops run its bulk (a scanned layer stack):
  the larger of it and XLA's count is the FLOPs reported and timed (XLA's stays as
  "xla_flops"). Collective bytes count every trip of a counted loop
  (`collective_bytes_per_run`); XLA's HBM bytes count a loop's body once, so for a program
  that loops over its bulk the memory term is a lower bound.
  """
  mem = memory(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, hbm = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  xla_flops = flops
  flops = max(flops, loop_flops or 0.0)
  hlo = compiled.as_text()
  coll = collectives(hlo)
  ici = collective_bytes_per_run(hlo)
  return {
    "chip": dataclasses.asdict(chip),
    "memory": mem,
    "fits": mem["total"] <= chip.hbm_bytes,
    "short_bytes": max(0, mem["total"] - int(chip.hbm_bytes)),
    "flops": flops,
    "xla_flops": xla_flops,
    "hbm_bytes": hbm,
    "collectives_outside_loops": coll["outside_loops"].as_dict(),
    "collectives_per_loop_step": [c.as_dict() for c in coll["loops"]],
    "collective_bytes": ici,  # every loop trip counted (`collective_bytes_per_run`)
    "roofline_s": roofline_s(flops, hbm, ici, chip),
  }
