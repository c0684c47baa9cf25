"""Every program a config's job runs, compiled for a TPU slice from shapes alone.

  report = compile_job(config, "v5e:2x4")   # the slice described by libtpu; no TPU touched
  print(table(report))                      # and json.dumps(report)

The programs are the ones the job runs, built by the same functions:
  train_step  the training loop's jit (`train_lib.jit_train_step`): config.mesh over the
              slice's chips, the param rules, grad_accum, the compute dtype, a global batch
              of train.batch_size at the widest buckets (data.max_prompt_len / max_target_len)
  eval_loss   the loss of an evaluation batch, the same shapes
  decode      the decoder of config.decode.method (`methods.build`, the front's program)
              over decode.batch_size prompts of the widest prompt bucket, decode.max_new_tokens
              new tokens; a hybrid's LLM encoder runs in its prefill
  prefill     that decoder's prefill alone (every method's first part)

No weight is read and no data is needed: params are ShapeDtypeStructs on the shardings the
run would place them on (`assemble.abstract`), batches the shapes the padder makes.
`cost_analysis()` counts a `while` loop's body once, whatever its trip count: the decoder's
step is costed from each model's call in the loop (`extend` through the prefill's cache,
on the loop's rows and cache shardings) compiled on its own, and its collectives are those
of the compiled loop's body (`aot.collectives`). A program that does not fit the chip's
HBM is reported, not raised.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2s_jax import aot, assemble, config_schema, methods, sharding, train_lib
from l2s_jax.buckets import bucket_length
from l2s_jax.collab import Routed, Speculative
from l2s_jax.data import batching
from l2s_jax.decoding.spec import extend
from l2s_jax.optimizer import make_optimizer

PROGRAMS = ("train_step", "eval_loss", "decode")


def job_config(config: ml_collections.ConfigDict | None, workdir: str | None):
  """The config to compile: `config`, or a trained workdir's (its checkpoint's) when only
  the workdir is given."""
  if config is None and workdir is None:
    raise ValueError("give a config (--config) or a trained workdir (--workdir)")
  return assemble.config_from_workdir(workdir) if config is None else config


def job_mesh(config: ml_collections.ConfigDict, topology: str):
  """(config.mesh over the slice's devices, one device's figures: a chip's, or a
  TensorCore's where libtpu counts those, as on v4)."""
  devices = aot.topology_devices(topology)
  chip = aot.per_device(aot.chip_of(topology), devices)
  try:
    mesh = sharding.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ValueError(
      f"config.mesh {dict(config.mesh)} does not fit the topology {topology!r} of "
      f"{len(devices)} devices: {e}"
    ) from None
  return mesh, chip


def compile_job(
  config: ml_collections.ConfigDict,
  topology: str,
  *,
  programs=PROGRAMS,
  workdir: str | None = None,
) -> dict:
  """Compiles `programs` of the job for the TPU slice `topology` and reports each:
  compile time, per-chip memory against the HBM, FLOPs and HBM bytes, collectives and a
  roofline estimate (`aot.analyze`); the decoder per step besides. `workdir`: a trained
  run, whose kept tokenizers size the vocabularies (otherwise the presets' own)."""
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise ValueError(f"unknown programs {unknown}: choose from {', '.join(PROGRAMS)}")
  config_schema.validate(config)
  if config.decode.weights != "stored" and "decode" in programs:
    raise ValueError(
      f"decode.weights={config.decode.weights!r}: quantized weights are not compiled ahead "
      "of time yet; compile with decode.weights=stored"
    )
  mesh, chip = job_mesh(config, topology)
  sizes = assemble.kept_vocab_sizes(config, workdir) if workdir else {}
  run = assemble.abstract(config, mesh, **sizes)
  report = {
    "topology": topology,
    "devices": int(mesh.devices.size),
    "chip": dataclasses.asdict(chip),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "params": _param_report(run),
    "programs": {},
  }
  for name in programs:
    if name == "train_step":
      report["programs"]["train_step"] = _train_step(run, chip)
    elif name == "eval_loss":
      report["programs"]["eval_loss"] = _eval_loss(run, chip)
    else:
      report["programs"].update(_decode(run, chip))
  return report


def _param_report(run) -> dict:
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  return {"trainable": count(run.trainable), "frozen": count(run.frozen)}


# --- shapes of the job's batches ----------------------------------------------------------


def widest_batch(config: ml_collections.ConfigDict, run, batch_size: int) -> dict:
  """The padder's batch of `batch_size` rows at the widest buckets the config allows:
  {key: ShapeDtypeStruct} laid over the mesh's data axes, as the training loop lays it."""
  kind, hybrid = run.adapter.kind, run.adapter.is_hybrid
  d = config.data
  two = hybrid and bool(d.llm_tokenizer) and d.llm_tokenizer != d.tokenizer
  padder = batching.Padder(
    kind, 0, 0, tuple(d.prompt_buckets), tuple(d.target_buckets), hybrid=hybrid, overlaps=two
  )
  longest = {"inputs": d.max_prompt_len, "targets": d.max_target_len}
  if kind == batching.DECODER_ONLY:
    longest = {"tokens": d.max_prompt_len + d.max_target_len}
  if hybrid:
    longest["llm_inputs"] = d.max_prompt_len
  host = padder([], batch_size, lengths=longest)
  return {
    k: jax.ShapeDtypeStruct(
      v.shape,
      jax.dtypes.canonicalize_dtype(v.dtype),
      sharding=sharding.batch_sharding(run.mesh, v.ndim),
    )
    for k, v in host.items()
  }


# --- the programs ---------------------------------------------------------------------------


def _compile(lowered, chip) -> tuple[object | None, dict]:
  """(compiled or None, {compile_s, and the compiler's error if it refused: the program
  does not fit})."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA refuses a program larger than the chip's memory
    text = " ".join(str(e).split())
    if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
      raise
    return None, {
      "compile_s": time.perf_counter() - start,
      "fits": False,
      "short_bytes": _short_bytes(text, chip),
      "error": text[:600],
    }
  return compiled, {"compile_s": time.perf_counter() - start}


def _short_bytes(text: str, chip) -> int | None:
  """How much more than the chip's HBM the compiler says the program needs, when it says."""
  unit = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  m = re.search(r"[Uu]sed ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", text)
  if m:
    return int(float(m.group(1)) * unit[m.group(2)] - chip.hbm_bytes)
  # "... required for HLO temporaries (43.26G) exceeds available HBM (31.25G)": the
  # temporaries alone (the arguments come on top, so the program is short of at least this).
  m = re.search(
    r"temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)", text
  )
  if m:
    return int(float(m.group(1)) * unit[m.group(2)] - float(m.group(3)) * unit[m.group(4)])
  return None


def _analyzed(lowered, chip, traced=None, chips: int = 1) -> dict:
  """`traced` (the program's `jit(...).trace`): its FLOPs are also counted through every
  loop's trip count (`aot.jaxpr_flops`), which XLA's count does not do."""
  compiled, info = _compile(lowered, chip)
  if compiled is None:
    return info
  loop_flops = None if traced is None else aot.jaxpr_flops(traced.jaxpr) / chips
  return {**info, **aot.analyze(compiled, chip, loop_flops=loop_flops), "_hlo": compiled.as_text()}


def _train_step(run, chip) -> dict:
  config = run.config
  tx, schedule = make_optimizer(config.opt, int(config.train.steps))
  state_sh = train_lib.train_state_shardings(run, tx)
  state = train_lib.abstract_state(run, tx, state_sh)
  batch = widest_batch(config, run, config.train.batch_size)
  step = train_lib.jit_train_step(
    run, tx, schedule, state_sh, {k: v.sharding for k, v in batch.items()}
  )
  traced = step.trace(state, run.frozen, batch)
  out = _analyzed(traced.lower(), chip, traced, run.mesh.size)
  out["batch"] = {k: list(v.shape) for k, v in batch.items()}
  out["note"] = (
    "FLOPs and collective bytes count every loop trip (micro-batches, scanned layers, "
    "attention's query blocks); XLA's HBM bytes count a loop's body once, so where loops "
    "run the bulk the memory term is a lower bound"
  )
  return _public(out)


def _eval_loss(run, chip) -> dict:
  batch = widest_batch(run.config, run, run.config.train.batch_size)
  traced = train_lib.jit_eval_step(run).trace(run.trainable, run.frozen, batch)
  return _public(_analyzed(traced.lower(), chip, traced, run.mesh.size))


def _decode(run, chip) -> dict:
  """{"decode": the whole decoder, with its step, "prefill": the prefill alone}."""
  config = run.config
  method = methods.build(config, run, partner=assemble.abstract_partner)
  dp = sharding.data_parallel_size(run.mesh)
  rows = -(-config.decode.batch_size // dp) * dp  # the front pads rows to the data axes
  batch = widest_batch(config, run, rows)
  # Prompts of the widest bucket (the front pads prompts up to data.prompt_buckets).
  width = bucket_length(config.data.max_prompt_len, tuple(config.data.prompt_buckets))
  ids = mask = jax.ShapeDtypeStruct((rows, width), jnp.int32)
  extra = jax.eval_shape(lambda b: run.adapter.prompt_extras(b, width), batch)
  shape = dict(
    batch_size=rows,
    prompt_width=int(ids.shape[1]),
    max_new_tokens=int(config.decode.max_new_tokens),
    method=config.decode.method,
    models=len(method.models),
  )
  lowered = method.lower(ids, mask, extra, prefill_only=True)
  prefill_compiled, info = _compile(lowered, chip)
  if prefill_compiled is None:
    return {"prefill": {**info, **shape}}
  prefill = {**info, **aot.analyze(prefill_compiled, chip)}
  whole = _analyzed(method.lower(ids, mask, extra), chip)
  whole.update(shape)
  if "_hlo" in whole:
    caches = jax.tree.map(
      lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
      lowered.out_info[1],
      prefill_compiled.output_shardings[1],
    )
    whole["step"] = _step(method, caches, whole["_hlo"], chip)
    # The whole call: the prefill, then max_new_tokens steps (every row runs to the end;
    # a speculative step makes up to gamma + 1 tokens, so this bounds it from above).
    whole["call_estimate_s"] = (
      prefill["roofline_s"] + whole["max_new_tokens"] * whole["step"]["roofline_s"]
    )
  return {"decode": _public(whole), "prefill": {**prefill, **shape}}


def _step(method, caches, hlo: str, chip) -> dict:
  """One iteration of the decoder's loop. XLA counts a loop's body once whatever its trip
  count, so each model's call in the loop (its `extend`: the next token through the KV
  cache the prefill left) is compiled on its own, on the rows and cache shardings the
  loop has; the collectives are those of the compiled loop's body itself (the last
  `while` outside the others: a prompt prefilled in chunks loops too, before it)."""
  spec = method.spec
  k = int(getattr(spec, "num_beams", 1))
  calls = {}
  for name, model, params, cache in zip(spec.model_names, method.models, method.params, caches):
    calls[name] = _call(model, params, cache, k, 1, chip)
    if isinstance(spec, Speculative) and name == "large":
      calls["large_verify"] = _call(model, params, cache, k, int(spec.gamma) + 1, chip)
  loops = aot.collectives(hlo)["loops"]
  body = loops[-1] if loops else aot.Collectives()
  if isinstance(spec, Speculative):  # gamma drafts, one verify: up to gamma + 1 tokens
    parts = [("small", int(spec.gamma)), ("large_verify", 1)]
  elif isinstance(spec, Routed):  # every token the small model; the large when routed
    parts = [("small", 1)]
  else:  # one token: each model's call (greedy, sample, beam, contrastive, proxy)
    parts = [(name, 1) for name in spec.model_names]
  flops = sum(n * calls[c]["flops"] for c, n in parts)
  hbm = sum(n * calls[c]["hbm_bytes"] for c, n in parts)
  ici = float(sum(body.bytes.values()))
  out = {
    "flops": flops,
    "hbm_bytes": hbm,
    "collectives": body.as_dict(),
    "roofline_s": sum(n * calls[c]["roofline_s"] for c, n in parts) + ici / chip.ici_bytes_per_s,
    "bound": "compute" if flops / chip.peak_bf16_flops > hbm / chip.hbm_bytes_per_s else "memory",
    "calls": calls,
    "counted": {c: n for c, n in parts},
  }
  if isinstance(spec, Routed):
    out["large_call_s"] = calls["large"]["roofline_s"]
  return out


def _call(model, params, cache, beams: int, tokens: int, chip) -> dict:
  """FLOPs, HBM bytes and roofline of `model` reading `tokens` more tokens per row through
  `cache` (beams: the cache repeated for each beam, as beam search runs it)."""
  if beams > 1:
    cache = jax.tree.map(
      lambda x: (
        jax.ShapeDtypeStruct((x.shape[0] * beams, *x.shape[1:]), x.dtype, sharding=x.sharding)
        if x.ndim
        else x
      ),
      cache,
    )
  rows = jax.tree.leaves(cache["index"])[0]
  tokens_BT = jax.ShapeDtypeStruct(
    (rows.shape[0], tokens), jnp.int32, sharding=sharding.batch_sharding(rows.sharding.mesh, 2)
  )
  fn = jax.jit(lambda p, t, c: extend(model, p, t, c), donate_argnums=(2,))
  compiled, info = _compile(fn.lower(params, tokens_BT, cache), chip)
  if compiled is None:
    return {**info, "flops": math.nan, "hbm_bytes": math.nan, "roofline_s": math.nan}
  report = aot.analyze(compiled, chip)
  return {k: report[k] for k in ("fits", "flops", "hbm_bytes", "roofline_s")}


def _public(report: dict) -> dict:
  return {k: v for k, v in report.items() if not k.startswith("_")}


# --- the table --------------------------------------------------------------------------------


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.2f}"


def _ms(s) -> str:
  return "-" if s is None else f"{s * 1e3:.3g}"


def _coll(d: dict) -> str:
  return ", ".join(f"{v['count']} {k}" for k, v in sorted(d.items())) or "none"


def table(report: dict) -> str:
  """The report as a text table: per program, compile time, per-chip memory against the
  HBM, FLOPs (train and loss steps: every loop trip) and HBM bytes (XLA's: a loop's body
  once), the roofline estimate (the decoder's: its prefill and max_new_tokens steps) and
  the collectives outside loops;
  the decoder's step on a row of its own."""
  chip = report["chip"]
  head = (
    f"{report['topology']}: {report['devices']} x {chip['name']} "
    f"({chip['hbm_bytes'] / 2**30:.1f} GiB HBM, {chip['peak_bf16_flops'] / 1e12:.0f} bf16 "
    f"TFLOP/s, {chip['hbm_bytes_per_s'] / 1e9:.0f} GB/s), mesh {report['mesh']}; params "
    f"{report['params']['trainable']:,} trained, {report['params']['frozen']:,} frozen"
  )
  rows = [("program", "compile s", "args GiB", "temp GiB", "total GiB", "fits", "GFLOP",
           "HBM GB", "estimate ms", "collectives")]  # fmt: skip
  for name, p in report["programs"].items():
    mem = p.get("memory", {})
    fits = "yes" if p.get("fits") else f"no, short {_gib(p.get('short_bytes'))} GiB"
    coll = p.get("collectives_outside_loops", {})
    rows.append((
      name, f"{p['compile_s']:.1f}", _gib(mem.get("arguments")), _gib(mem.get("temporaries")),
      _gib(mem.get("total")), fits, _num(p.get("flops"), 1e9), _num(p.get("hbm_bytes"), 1e9),
      _ms(p.get("call_estimate_s", p.get("roofline_s"))), _coll(coll) if "memory" in p else "-",
    ))  # fmt: skip
    if "step" in p:
      s = p["step"]
      rows.append((
        "  per step", "", "", "", "", "", _num(s["flops"], 1e9), _num(s["hbm_bytes"], 1e9),
        f"{_ms(s['roofline_s'])} ({s['bound']})", _coll(s["collectives"]),
      ))  # fmt: skip
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  return "\n".join([head, *lines])


def _num(x, unit) -> str:
  return "-" if x is None else f"{x / unit:.4g}"


def as_json(report: dict) -> dict:
  """The report with plain numbers only (numpy scalars made Python's)."""
  return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, report)
