"""The papers' settings at their real sizes, compiled for TPU slices from this CPU: estimates.

Every program is compiled by `l2s_jax.compile_lib` (the job's own functions, params known
by their shapes, no weights) for TPU slices libtpu describes, and read off the compiled
program: per-chip memory against the HBM, FLOPs and HBM bytes, collectives, and a roofline
estimate max(FLOPs / peak, bytes / HBM bandwidth) + collective bytes / ICI bandwidth
(`l2s_jax.aot.CHIPS`, with sources). Nothing runs on a TPU: these are estimates, not runs.

  LLM-to-SLM: T5-large / T5-3B / T5-11B encoders -> T5-small, and T5-large -> GPT-2:
    the train step (batch 256 x 128 + 128 tokens, bf16 compute, fsdp x data), whether it
    fits, its estimate and MFU ceiling (FLOPs / (estimate x peak)); decoding 128 new
    tokens at batch 1 and 64 (greedy): time per token, and the estimated speedup over the
    LLM decoding alone (its whole encoder-decoder, the same tokens), beside the paper's 4x.
  Speculative and routed decoding: Qwen2.5-7B with Qwen2.5-0.5B, Llama-3.1-8B with
    Llama-3.2-1B: each model's decode step alone (batch 1 and 64) and the large model's
    verify call (gamma + 1 tokens through its cache); Leviathan's expected speedup at
    acceptance rates 0.6 / 0.8 / 0.9, and the routed method's time per token at large-model
    call rates 0.1 / 0.2 / 0.3 (a small step every token, a large one when routed).
  The estimator's check: a bf16 matmul compiled the same way against FLOPs / peak.

  python bench/tpu_compile.py [--chips v5e:2x4,v5p:2x2x1,v6e:2x4] [--only l2s,spec,check]
      [--hybrids t5-large>t5-small,...] [--pairs qwen2.5-7b/qwen2.5-0.5b,...] [--batches 1,64]
      [--json out.json]   (--from-json a.json b.json: the tables of earlier runs, merged)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import common
from l2s_jax import aot, build, compile_lib, sharding
from l2s_jax.collab.speculative import expected_speedup
from l2s_jax.config_schema import base_config
from l2s_jax.models import init_params, layers, llama

HYBRIDS = (("t5-large", "t5-small"), ("t5-3b", "t5-small"), ("t5-11b", "t5-small"),
           ("t5-large", "gpt2"))  # fmt: skip
PAIRS = (("qwen2.5-7b", "qwen2.5-0.5b"), ("llama-3.1-8b", "llama-3.2-1b"))
NEW_TOKENS, PROMPT, TRAIN_BATCH, GAMMA = 128, 128, 256, 4
# The smallest v5e and v5p slices first, fsdp x tensor.
FIT_CANDIDATES = (("v5e:2x2", {"fsdp": 2, "tensor": 2}), ("v5p:2x2x1", {"fsdp": 2, "tensor": 2}),
                  ("v5e:2x4", {"fsdp": 4, "tensor": 2}))  # fmt: skip


def job(slm: str, llm: str | None, *, mesh: dict, batch: int, rules: str) -> object:
  """A config of the paper's shapes: prompts and targets of 128 tokens, bf16 compute, the
  frozen LLM stored in bf16, the trained part in float32."""
  c = base_config()
  c.model.kind = "hybrid" if llm else "plain"
  c.slm.preset = slm
  if llm:
    c.llm.preset, c.llm.dtype, c.llm.rules = llm, "bfloat16", rules
  else:
    c.slm.dtype = "bfloat16"  # a model decoding alone: its weights as served
  c.slm.rules = rules
  c.data.max_prompt_len = c.data.max_target_len = PROMPT
  c.data.prompt_buckets = c.data.target_buckets = (PROMPT,)
  c.train.compute_dtype = "bfloat16"
  c.train.batch_size = TRAIN_BATCH
  c.decode.max_new_tokens = NEW_TOKENS
  c.decode.batch_size = batch
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (
    mesh.get("data", 1),
    mesh.get("fsdp", 1),
    mesh.get("tensor", 1),
  )
  return c


def param_count(preset: str) -> int:
  cls, cfg = build.preset(preset)
  shapes = jax.eval_shape(lambda: init_params(cls(cfg), jax.random.PRNGKey(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def decode_mesh(chips: int, batch: int, *presets: str) -> dict:
  """A batch of models up to 3B params: rows over `data`, params copied to every chip.
  Batch 1, or larger models: everything a mesh axis divides over `tensor` (heads, FFN,
  vocabulary; what it does not divide stays whole), so each chip reads 1 / chips of the
  weights per step. (Batch 1 over a data or fsdp axis would run padding rows.)"""
  if batch > 1 and max(param_count(p) for p in presets) <= 3e9:
    return {"data": chips}
  return {"tensor": chips}


def compiled(config, topology, programs):
  t = time.perf_counter()
  report = compile_lib.compile_job(config, topology, programs=programs)
  print(f"  compiled {programs} in {time.perf_counter() - t:.0f} s", flush=True)
  return report


def decode_cost(report) -> dict:
  d, pre = report["programs"].get("decode", {}), report["programs"]["prefill"]
  if "step" not in d:
    return {"fits": False, "short_gib": (pre.get("short_bytes") or 0) / 2**30}
  return {
    "fits": bool(d["fits"] and pre["fits"]),
    "memory_gib": d["memory"]["total"] / 2**30,
    "prefill_ms": pre["roofline_s"] * 1e3,
    "step_ms": d["step"]["roofline_s"] * 1e3,
    "step_bound": d["step"]["bound"],
    "step_collectives": d["step"]["collectives"],
    "calls_ms": {k: v["roofline_s"] * 1e3 for k, v in d["step"]["calls"].items()},
  }


def l2s(topology: str, chips: int, hybrids=HYBRIDS, save=lambda row: None) -> list[dict]:
  rows, alone_cache = [], {}
  for llm, slm in hybrids:
    print(f"{topology}: {llm} -> {slm}", flush=True)
    mesh = {"data": chips // 4, "fsdp": 4} if chips >= 4 else {"fsdp": chips}
    r = compiled(job(slm, llm, mesh=mesh, batch=64, rules="fsdp_tensor"), topology, ("train_step",))
    tr = r["programs"]["train_step"]
    chip = r["chip"]
    row = {"chip": topology, "llm": llm, "slm": slm, "train_mesh": mesh, "train_fits": tr["fits"]}
    if "memory" in tr:
      row.update(
        train_gib=tr["memory"]["total"] / 2**30,
        train_ms=tr["roofline_s"] * 1e3,
        mfu_ceiling=tr["flops"] / chip["peak_bf16_flops"] / tr["roofline_s"],
        train_collectives=tr["collectives_outside_loops"],
      )
    for batch in (1, 64):
      hybrid = compiled(
        job(slm, llm, mesh=decode_mesh(chips, batch, llm, slm), batch=batch, rules="fsdp_tensor"),
        topology,
        ("decode",),
      )
      if (llm, batch) not in alone_cache:
        alone_cache[llm, batch] = decode_cost(
          compiled(
            job(llm, None, mesh=decode_mesh(chips, batch, llm), batch=batch, rules="fsdp_tensor"),
            topology,
            ("decode",),
          )
        )
      h, a = decode_cost(hybrid), alone_cache[llm, batch]
      row[f"b{batch}"] = {"hybrid": h, "llm_alone": a}
      if h.get("step_ms") and a.get("step_ms"):
        total = lambda c: c["prefill_ms"] + NEW_TOKENS * c["step_ms"]
        row[f"b{batch}"]["speedup"] = total(a) / total(h)
    rows.append(row)
    save(row)
  return rows


def spec(topology: str, chips: int, pairs=PAIRS, batches=(1, 64), save=lambda row: None):
  """Speculative decoding of each pair compiled as the job runs it (gamma drafts and the
  large model's verify of gamma + 1 tokens: `compile_lib`'s step calls); Leviathan's
  expected speedup from those costs, and the routed method's time per token."""
  rows = []
  for large, small in pairs:
    for batch in batches:
      print(f"{topology}: {large} / {small}, batch {batch}", flush=True)
      config = job(small, None, mesh=decode_mesh(chips, batch, large, small), batch=batch,
                   rules="fsdp_tensor")  # fmt: skip
      config.decode.method = "speculative"
      config.collab.preset, config.collab.rules, config.collab.gamma = large, "fsdp_tensor", GAMMA
      config.collab.dtype = "bfloat16"
      cost = decode_cost(compiled(config, topology, ("decode",)))
      row = {"chip": topology, "large": large, "small": small, "batch": batch, **cost}
      calls = cost.get("calls_ms", {})
      if all(math.isfinite(calls.get(k, math.nan)) for k in ("small", "large", "large_verify")):
        # Leviathan's c: a draft step over the large model's call; the verify call reads
        # gamma + 1 tokens, so an iteration costs gamma small steps and one verify.
        c = calls["small"] / calls["large_verify"]
        for alpha in (0.6, 0.8, 0.9):
          row[f"speculative_{alpha}"] = (
            expected_speedup(alpha, GAMMA, c) * calls["large"] / calls["large_verify"]
          )
        for rate in (0.1, 0.2, 0.3):
          row[f"routed_{rate}_ms"] = calls["small"] + rate * calls["large"]
      rows.append(row)
      save(row)
  return rows


def fit_11b(candidates) -> list[dict]:
  """The T5-11B-encoder hybrid's train step on fsdp x tensor slices: which fit."""
  rows = []
  for topology, mesh in candidates:
    print(f"{topology}: t5-11b -> t5-small train step, mesh {mesh}", flush=True)
    tr = compiled(job("t5-small", "t5-11b", mesh=mesh, batch=64, rules="fsdp_tensor"), topology,
                  ("train_step",))["programs"]["train_step"]  # fmt: skip
    rows.append({"chip": topology, "mesh": mesh, "fits": tr["fits"],
                 "total_gib": tr.get("memory", {}).get("total", 0) / 2**30,
                 "short_gib": (tr.get("short_bytes") or 0) / 2**30})  # fmt: skip
  return rows


def _public_config(num_layers: int | None = None):
  c = job("llama-3.1-8b", None, mesh={"fsdp": 8}, batch=8, rules="fsdp_tensor")
  c.slm.dtype = "float32"  # trained: float32 params and Adam moments
  if num_layers is not None:
    c.slm.overrides = {**c.slm.overrides, "num_hidden_layers": num_layers}
  c.train.remat = True
  c.data.max_prompt_len = c.data.max_target_len = 4096
  c.data.prompt_buckets = c.data.target_buckets = (4096,)
  c.train.batch_size = 8
  return c


@contextlib.contextmanager
def _loops_unrolled():
  """The layers as a Python loop and attention over all queries at once, so that XLA's HBM
  bytes count every layer and every query (it counts a loop's body once). The step then
  needs more memory, so it is compiled with few layers and the bytes a layer extrapolated."""
  saved = layers.QUERY_BLOCK, llama.Llama.scan_block
  layers.QUERY_BLOCK, llama.Llama.scan_block = 1 << 30, lambda self: None
  try:
    yield
  finally:
    layers.QUERY_BLOCK, llama.Llama.scan_block = saved


def public_check() -> dict:
  """Llama-3.1-8B's train step on v6e-8 (fsdp 8, bf16, sequences of 8192 tokens, one a chip)
  beside MaxText's measured figure for the same model and chip kind: 7,207 tokens/s per
  device at 45.46% MFU (256 v6e chips, BF16, SL=8192; maxtext.readthedocs.io, "Optimized
  models tiering", v0.2.0). The estimate is a roofline: a ceiling a run reaches part of.
  Each layer is rematerialized (`train.remat`), as MaxText's runs of this size are.

  The step scans its layers and attention loops over query blocks, and XLA counts a loop's
  HBM bytes once; the bytes of all 32 layers come from the same step compiled with 2 and 4
  layers unrolled (`_loops_unrolled`): the 2-layer step's bytes plus 30 times the
  difference per layer."""
  r = compiled(_public_config(), "v6e:2x4", ("train_step",))
  tr, chip = r["programs"]["train_step"], r["chip"]
  params = r["params"]["trainable"]
  out = {
    "chip": "v6e:2x4",
    "fits": tr["fits"],
    "memory_gib": tr.get("memory", {}).get("total", 0) / 2**30,
    "short_gib": (tr.get("short_bytes") or 0) / 2**30,
  }
  if "error" in tr:
    out["error"] = tr["error"]
    return out
  with _loops_unrolled():
    unrolled = {n: compiled(_public_config(n), "v6e:2x4", ("train_step",)) for n in (2, 4)}
  few = {n: u["programs"]["train_step"]["hbm_bytes"] for n, u in unrolled.items()}
  layers_n = build.preset("llama-3.1-8b")[1].num_hidden_layers
  hbm_bytes = few[2] + (layers_n - 2) * (few[4] - few[2]) / 2
  tokens = 8192  # per device and step
  flops_s = tr["flops"] / chip["peak_bf16_flops"]
  hbm_s = hbm_bytes / chip["hbm_bytes_per_s"]
  ici_s = tr["collective_bytes"] / chip["ici_bytes_per_s"]
  estimate_s = max(flops_s, hbm_s) + ici_s
  out.update(
    flops_ms=flops_s * 1e3,
    hbm_bytes_by_layers={str(n): b for n, b in few.items()},
    hbm_bytes=hbm_bytes,
    hbm_ms=hbm_s * 1e3,
    ici_ms=ici_s * 1e3,
    estimate_ms=estimate_s * 1e3,
    compute_only_tokens_per_s_per_device=tokens / (flops_s + ici_s),
    tokens_per_s_per_device=tokens / estimate_s,
    maxtext_tokens_per_s_per_device=7207,
    flops_per_device=tr["flops"],  # every loop trip counted (compile_lib)
    six_n_t_flops_per_device=6 * params * tokens,
    mfu_ceiling=tr["flops"] / chip["peak_bf16_flops"] / estimate_s,
  )
  return out


def matmul_check(topology: str) -> dict:
  """A bf16 [8192, 8192] @ [8192, 8192] over every chip (rows split): FLOPs / peak against
  the estimate."""
  devices = aot.topology_devices(topology)
  chip = aot.chip_of(topology)
  mesh = sharding.make_mesh({"data": len(devices)}, devices)
  n = 8192
  x = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None)))
  w = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  report = aot.analyze(jax.jit(lambda a, b: a @ b).lower(x, w).compile(), chip)
  ideal = 2 * n**3 / len(devices) / chip.peak_bf16_flops
  return {"chip": topology, "ideal_ms": ideal * 1e3, "estimate_ms": report["roofline_s"] * 1e3,
          "ratio": report["roofline_s"] / ideal}  # fmt: skip


def markdown(rows: dict) -> str:
  """The tables of docs/benchmarks.md from the rows (`--from-json` rebuilds them)."""
  out = []
  f = lambda x, n=2: "-" if x is None else f"{x:.{n}f}"
  if "check" in rows:
    out += ["| slice | FLOPs / peak (ms) | estimate (ms) | ratio |", "|---|---|---|---|"]
    out += [f"| {r['chip']} | {f(r['ideal_ms'], 3)} | {f(r['estimate_ms'], 3)} | {f(r['ratio'], 3)} |"
            for r in rows["check"]]  # fmt: skip
    out.append("")
  if "public" in rows:
    r = rows["public"]
    out += [
      "| Llama-3.1-8B train step, v6e-8 | fits | GiB/chip | FLOPs ms | HBM ms | ICI ms | "
      "estimate ms | tokens/s/device (estimate) | MaxText measured | FLOPs / 6NT |",
      "|---|---|---|---|---|---|---|---|---|---|",
      f"| fsdp 8, 8 x 8192 tokens, remat | {r['fits']} | "
      f"{f(r['memory_gib'], 1) if r['fits'] else 'short ' + f(r.get('short_gib'), 1)} | "
      f"{f(r.get('flops_ms'), 0)} | {f(r.get('hbm_ms'), 0)} | {f(r.get('ici_ms'), 0)} | "
      f"{f(r.get('estimate_ms'), 0)} | {f(r.get('tokens_per_s_per_device'), 0)} | "
      f"{r.get('maxtext_tokens_per_s_per_device')} (45.46% MFU) | "
      f"{f(r['flops_per_device'] / r['six_n_t_flops_per_device']) if 'flops_per_device' in r else '-'} |",
      "",
    ]
  if "l2s" in rows:
    out += [
      "| slice | LLM -> SLM | train: fits, GiB/chip | train ms | MFU ceiling | batch 1: LLM ms/token, "
      "hybrid ms/token, speedup | batch 64: LLM ms/token, hybrid ms/token, speedup |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in rows["l2s"]:
      cells = []
      for b in ("b1", "b64"):
        d = r.get(b, {})
        h, a = d.get("hybrid", {}), d.get("llm_alone", {})
        cells.append(f"{f(a.get('step_ms'))}, {f(h.get('step_ms'))}, {f(d.get('speedup'))}x")
      out.append(
        f"| {r['chip']} | {r['llm']} -> {r['slm']} | {r['train_fits']}, {f(r.get('train_gib'), 1)} | "
        f"{f(r.get('train_ms'), 0)} | {f(r.get('mfu_ceiling'))} | {cells[0]} | {cells[1]} |"
      )
    out.append("")
  if "spec" in rows:
    out += [
      "| slice | large / small | batch | large ms | verify ms | small ms | speculative speedup "
      "at 0.6 / 0.8 / 0.9 | routed ms/token at 0.1 / 0.2 / 0.3 |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows["spec"]:
      c = r.get("calls_ms", {})
      sp = " / ".join(f(r.get(f"speculative_{a}")) for a in (0.6, 0.8, 0.9))
      ro = " / ".join(f(r.get(f"routed_{a}_ms")) for a in (0.1, 0.2, 0.3))
      out.append(
        f"| {r['chip']} | {r['large']} / {r['small']} | {r['batch']} | {f(c.get('large'))} | "
        f"{f(c.get('large_verify'))} | {f(c.get('small'))} | {sp} | {ro} |"
      )
    out.append("")
  if "fit" in rows:
    out += ["| slice | mesh | T5-11B -> T5-small train step fits | GiB/chip | short GiB |",
            "|---|---|---|---|---|"]  # fmt: skip
    out += [f"| {r['chip']} | {r['mesh']} | {r['fits']} | {f(r['total_gib'], 1)} | {f(r['short_gib'], 1)} |"
            for r in rows["fit"]]  # fmt: skip
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--chips", default="v5e:2x4,v5p:2x2x1,v6e:2x4")
  ap.add_argument("--only", default="check,l2s,spec,fit,public")
  ap.add_argument("--hybrids", default=",".join(f"{a}>{b}" for a, b in HYBRIDS),
                  help="LLM>SLM pairs of the l2s part")  # fmt: skip
  ap.add_argument("--pairs", default=",".join(f"{a}/{b}" for a, b in PAIRS),
                  help="large/small pairs of the spec part")  # fmt: skip
  ap.add_argument("--batches", default="1,64", help="decode batches of the spec part")
  ap.add_argument("--json", default=None)
  ap.add_argument("--from-json", nargs="*", default=None, help="print the tables of these runs")
  args = ap.parse_args()
  if args.from_json is not None:
    rows = {}
    for path in args.from_json:
      with open(path) as fh:
        for k, v in json.load(fh)["rows"].items():
          rows[k] = rows.get(k, []) + v if isinstance(v, list) else v
    print(markdown(rows))
    return
  parts = args.only.split(",")
  hybrids = [tuple(h.split(">")) for h in args.hybrids.split(",")]
  pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  out = {"machine": common.machine(), "date": time.strftime("%Y-%m-%d"), "rows": {}}

  def saver(part):
    def save(row):
      out["rows"].setdefault(part, []).append(row)
      common.write_json(args.json, out)

    return save

  for topology in args.chips.split(","):
    chips = len(aot.topology_devices(topology))
    if "check" in parts:
      saver("check")(matmul_check(topology))
    if "l2s" in parts:  # the paper's pair first, then speculative, then the other encoders
      l2s(topology, chips, hybrids[:1], save=saver("l2s"))
    if "spec" in parts:
      spec(topology, chips, pairs, batches, save=saver("spec"))
    if "l2s" in parts:
      l2s(topology, chips, hybrids[1:], save=saver("l2s"))
  if "public" in parts:
    out["rows"]["public"] = public_check()
    common.write_json(args.json, out)
  if "fit" in parts:
    out["rows"]["fit"] = fit_11b(FIT_CANDIDATES)
    common.write_json(args.json, out)
  print(markdown(out["rows"]))


if __name__ == "__main__":
  main()
