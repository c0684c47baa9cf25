"""Greedy decoding: l2s_jax.generate vs transformers' (PyTorch) generate, in float32 and
bfloat16 on both sides (on the CPU; on a GPU both run there, see bench/gpu.sh).

Same random weights (T5-small and GPT-2 sizes), prompt 64, exactly 64 new tokens, batch 1
and 32; ours and theirs in each dtype run alternately after warm-up (compile time apart),
and every speedup is over transformers in its faster dtype. The roofline beside them:

  batch 1    the bandwidth bound: bytes of weights one step reads, in the weights' dtype,
             over the bandwidth of a jitted read of a 1 GiB array; and the product chain:
             the step's weight products alone, each input made from the previous output
             (the step without attention, norms or sampling), run by XLA and by PyTorch,
             the faster counting. Both are timed in the same alternation as the systems.
  batch 32   the peak matrix-product rate at the step's own shapes ([32, d_in] x
             [d_in, d_out] for every weight matrix a step reads), the best of PyTorch and
             of XLA:CPU under each kernel setting (`--xla_flags`, each measured in a
             subprocess, since XLA reads its flags once), and the fraction of it each
             system's step reaches (2 x weights x batch FLOPs per step); beside it the
             same product chain at batch 32, and the fraction a step would reach with
             its products as fast as that chain and its attention reading the KV cache
             at the measured bandwidth (`attainable`)

  python bench/decode.py [--json out.json] [--repeats 3] [--batches 1,32] \
      [--dtypes float32,bfloat16] [--xla_flags ',--xla_cpu_use_onednn=true,...']

The XLA flags this process decodes under are its own XLA_FLAGS (set them to compare).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import common  # noqa: E402
from l2s_jax import assemble  # noqa: E402
from l2s_jax.decoding import generate  # noqa: E402

PROMPT, NEW = 64, 64
TARGET_SPEEDUP = 2.0
TARGET_BANDWIDTH_RATIO = 1.1  # batch-1 time / the bandwidth bound
TARGET_PEAK_FRACTION = 0.6  # batch-32 step rate / the measured GEMM peak


def build(name: str, workdir: str, dtypes):
  """(transformers models {dtype: model}, ours {dtype: (model, params)}), one set of weights."""
  torch.manual_seed(0)
  if name == "t5-small":
    tm = tf.T5ForConditionalGeneration(
      tf.T5Config(dropout_rate=0.0, decoder_start_token_id=0)
    )  # t5-small's shape
  else:
    tm = tf.GPT2LMHeadModel(tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  tm.eval().to(common.torch_device())
  tm.generation_config.eos_token_id = None  # exactly NEW tokens on both sides
  tm.generation_config.pad_token_id = 0
  path = os.path.join(workdir, name)
  tm.save_pretrained(path)
  theirs, ours = {}, {}
  for dtype in dtypes:
    theirs[dtype] = tm if dtype == "float32" else copy.deepcopy(tm).to(getattr(torch, dtype))
    c = common.preset_config("", slm_path=path)
    c.slm.dtype = c.train.compute_dtype = dtype  # params stored and computed in it
    run = assemble.initial(c)  # params on the device
    ours[dtype] = run.compute_model, run.params
  return theirs, ours


def step_leaves(name: str, params):
  """(path, array) of every weight one decoding step reads: not T5's encoder (it runs once
  per prompt) nor its cross-attention k/v (projected once, kept in the cache), not GPT-2's
  position table (one row per step)."""
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if name == "t5-small":
      if key.startswith("encoder/") or "cross_attention/k" in key or "cross_attention/v" in key:
        continue
    elif key == "wpe":
      continue
    yield key, x


def step_matrices(name: str, params) -> list[tuple[int, int]]:
  """(d_in, d_out) of every weight matrix one decoding step multiplies by (heads merged),
  the tied output head included."""
  out = []
  for key, x in step_leaves(name, params):
    if x.ndim < 2 or key.endswith("bias") or "relative_attention_bias" in key:
      continue
    shape = x.shape
    if key.endswith("embedding"):  # [V, d]: the output head reads it as d x V
      out.append((shape[1], shape[0]))
    elif shape[0] == max(shape):  # [d, (3,) heads, head_dim], [d, d_ff]
      out.append((shape[0], int(np.prod(shape[1:]))))
    else:  # [heads, head_dim, d], [d_ff, d]
      out.append((int(np.prod(shape[:-1])), shape[-1]))
  return out


def gemm_peak(shapes, batch: int, dtype: str, repeats: int = 20) -> dict:
  """FLOP/s of the step's matrix products done back to back: XLA (this process's flags,
  one jitted program of them all) and PyTorch."""
  rng = np.random.RandomState(0)
  flops = sum(2 * batch * a * b for a, b in shapes)
  xs = [rng.randn(batch, a).astype(np.float32) for a, _ in shapes]
  ws = [rng.randn(a, b).astype(np.float32) * 0.02 for a, b in shapes]
  jdt = jax.numpy.dtype(dtype)
  jx = [jax.device_put(x.astype(jdt)) for x in xs]
  jw = [jax.device_put(w.astype(jdt)) for w in ws]
  f = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws)])
  jax.block_until_ready(f(jx, jw))
  best_xla = min(common.timed(lambda: jax.block_until_ready(f(jx, jw))) for _ in range(repeats))
  tdt = getattr(torch, dtype)
  dev = common.torch_device()
  tx = [torch.tensor(x).to(dev, tdt) for x in xs]
  tw = [torch.tensor(w).to(dev, tdt) for w in ws]
  with torch.no_grad():
    products = lambda: common.torch_sync([x @ w for x, w in zip(tx, tw)])
    products()
    best_torch = min(common.timed(products) for _ in range(repeats))
  return {"flops": flops, "xla": flops / best_xla, "torch": flops / best_torch}


def _resize(x, width: int, tile):
  """x [B, n] made [B, width]: its first `width` columns, or `tile`d up to them."""
  n = x.shape[1]
  return x[:, :width] if n >= width else tile(x, -(-width // n))[:, :width]


def product_chain(shapes, batch: int, dtype: str) -> dict[str, Callable[[], object]]:
  """{"xla": fn, "torch": fn}: a decoding step's weight products alone, in `dtype`, each
  [batch, d_in] input made from the previous product's output (its first d_in columns, or
  it tiled, then tanh), so that no product can start before the one before it has finished:
  the dependency a decoding step has. Nothing else runs (no attention, norms or sampling),
  so the faster of the two is what this machine's kernels make of the step's products."""
  rng = np.random.RandomState(0)
  ws = [rng.randn(a, b).astype(np.float32) * 0.02 for a, b in shapes]
  jw = [jax.device_put(w.astype(jax.numpy.dtype(dtype))) for w in ws]
  jx = jax.numpy.ones((batch, shapes[0][0]), jax.numpy.dtype(dtype))

  @jax.jit
  def xla_chain(x, ws):
    for w in ws:
      x = jax.numpy.tanh(_resize(x, w.shape[0], lambda y, k: jax.numpy.tile(y, (1, k))) @ w)
    return x

  dev = common.torch_device()
  tw = [torch.tensor(w).to(dev, getattr(torch, dtype)) for w in ws]
  tx = torch.ones(batch, shapes[0][0], device=dev, dtype=getattr(torch, dtype))

  def torch_chain():
    x = tx
    with torch.no_grad():
      for w in tw:
        x = torch.tanh(_resize(x, w.shape[0], lambda y, k: y.repeat(1, k)) @ w)
    return common.torch_sync(x)

  xla = lambda: jax.block_until_ready(xla_chain(jx, jw))
  xla(), torch_chain()  # compile, warm up
  return {"xla": xla, "torch": torch_chain}


def gemm_peaks_under_flags(shapes, batch: int, dtype: str, flag_sets) -> dict:
  """{XLA flags: FLOP/s} for each kernel setting (a subprocess each), plus PyTorch's."""
  out = {}
  for flags in flag_sets:
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS=jax.default_backend())
    res = subprocess.run(
      [
        sys.executable,
        os.path.abspath(__file__),
        "--gemm_only",
        json.dumps({"shapes": shapes, "batch": batch, "dtype": dtype}),
      ],
      env=env,
      capture_output=True,
      text=True,
    )
    if res.returncode:
      out[f"xla {flags or '(default)'}"] = f"failed: {res.stderr.strip().splitlines()[-1]}"
      continue
    got = json.loads(res.stdout.strip().splitlines()[-1])
    out[f"xla {flags or '(default)'}"] = got["xla"]
    out["torch"] = max(out.get("torch", 0.0), got["torch"])
  return out


def cache_read_bytes(name: str, model, batch: int, dtype: str) -> int:
  """Bytes of KV cache one decoding step attends over (every slot is read, masked or not):
  the decoder's self-attention cache, and for T5 the prompt's cross-attention keys and values."""
  cache = jax.eval_shape(lambda: model.init_cache(batch, model.cache_length(PROMPT, NEW)))
  total = sum(x.size * x.dtype.itemsize for layer in cache["layers"] for x in layer.values())
  if name == "t5-small":
    c = model.config
    total += (
      c.num_decoder_layers
      * 2
      * batch
      * c.num_heads
      * c.d_kv
      * PROMPT
      * jax.numpy.dtype(dtype).itemsize
    )
  return total


def decode_step_bytes(name: str, params) -> int:
  """Bytes of weights one batch-1 decoding step reads (in the params' dtype)."""
  return sum(x.size * x.dtype.itemsize for _, x in step_leaves(name, params))


def run(
  name: str,
  batch: int,
  theirs_by_dtype,
  ours_by_dtype,
  repeats: int,
  beside: dict[str, Callable[[], object]],
) -> tuple[dict, dict[str, float]]:
  """(the row, the median seconds of each of `beside`, timed in the same alternation)."""
  rng = np.random.RandomState(batch)
  ids = rng.randint(5, 1000, (batch, PROMPT)).astype(np.int64)
  mask = np.ones_like(ids)
  dev = common.torch_device()
  ids_t, mask_t = torch.tensor(ids).to(dev), torch.tensor(mask).to(dev)

  def ours(dtype, n=NEW):
    model, params = ours_by_dtype[dtype]
    out = generate(model, params, ids, mask, max_new_tokens=n, eos_id=None, prompt_buckets=None)
    return np.asarray(out.tokens)

  def theirs(dtype, n=NEW):
    with torch.no_grad():
      return (
        theirs_by_dtype[dtype]
        .generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False, max_new_tokens=n)
        .cpu()
        .numpy()
      )

  row = {"model": name, "batch": batch}
  fns, outs = {}, {}
  for dtype in ours_by_dtype:
    first_call = common.timed(lambda: ours(dtype))  # traces and compiles
    row[f"compile_s_{dtype}"] = first_call - common.timed(lambda: ours(dtype))
    ours(dtype, 1)
    outs[f"ours_{dtype}"] = ours(dtype)
    got = theirs(dtype)
    outs[f"hf_{dtype}"] = got[:, 1:] if name == "t5-small" else got[:, PROMPT:]
    assert outs[f"hf_{dtype}"].shape == (batch, NEW), outs[f"hf_{dtype}"].shape
    fns.update(
      {
        f"ours_{dtype}": lambda d=dtype: ours(d),
        f"hf_{dtype}": lambda d=dtype: theirs(d),
        f"ours_{dtype}_1": lambda d=dtype: ours(d, 1),
        f"hf_{dtype}_1": lambda d=dtype: theirs(d, 1),
      }
    )
  times = common.alternate({**fns, **beside}, repeats)
  for dtype in ours_by_dtype:
    for who in ("ours", "hf"):
      t, t1 = times[f"{who}_{dtype}"], times[f"{who}_{dtype}_1"]
      row[f"{who}_{dtype}_tok_s"] = batch * NEW / t
      row[f"{who}_{dtype}_ms_per_token"] = 1e3 * (t - t1) / (NEW - 1)
      row[f"{who}_{dtype}_s"] = t
    # Greedy tokens against transformers in the same dtype, and against our float32.
    row[f"agree_hf_{dtype}"] = float((outs[f"ours_{dtype}"] == outs[f"hf_{dtype}"]).mean())
    row[f"agree_f32_{dtype}"] = (
      float((outs[f"ours_{dtype}"] == outs["ours_float32"]).mean())
      if "ours_float32" in outs
      else None
    )
  hf_best = min((times[f"hf_{d}"], d) for d in ours_by_dtype)
  ours_best = min((times[f"ours_{d}"], d) for d in ours_by_dtype)
  row["hf_best_dtype"], row["ours_best_dtype"] = hf_best[1], ours_best[1]
  row["speedup"] = hf_best[0] / ours_best[0]  # our best over theirs at its best
  for d in ours_by_dtype:
    row[f"speedup_{d}_vs_hf_best"] = hf_best[0] / times[f"ours_{d}"]
  row["target_speedup"] = TARGET_SPEEDUP
  row["speedup_met"] = row["speedup"] >= TARGET_SPEEDUP
  return row, {k: times[k] for k in beside}


XLA_KERNEL_FLAGS = (
  "",
  "--xla_cpu_use_xnnpack=true",
  "--xla_cpu_use_onednn=true",
  "--xla_cpu_use_thunk_runtime=false",
)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--models", default="t5-small,gpt2")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument(
    "--xla_flags",
    default=",".join(XLA_KERNEL_FLAGS),
    help="comma-separated XLA flag settings whose GEMM rates are measured",
  )
  parser.add_argument("--gemm_only", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  if args.gemm_only:  # a subprocess of gemm_peaks_under_flags
    spec = json.loads(args.gemm_only)
    print(json.dumps(gemm_peak([tuple(x) for x in spec["shapes"]], spec["batch"], spec["dtype"])))
    return
  dtypes = args.dtypes.split(",")
  flag_sets = args.xla_flags.split(",")
  for name in args.models.split(","):  # build() knows these two shapes only
    if name not in ("t5-small", "gpt2"):
      parser.error(f"--models: {name!r} is not t5-small or gpt2")
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      parser.error(f"--dtypes: {d!r} is not float32 or bfloat16")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      theirs, ours = build(name, tmp, dtypes)
      shapes = {d: step_matrices(name, ours[d][1]) for d in dtypes}  # the same at every batch
      for batch in [int(b) for b in args.batches.split(",")]:
        beside = {}  # the roofline's references, timed beside the systems
        beside["read"], probe_bytes = common.bandwidth_probe()
        for d in dtypes:
          chains = product_chain(shapes[d], batch, d)
          beside.update({f"chain_{lib}_{d}": fn for lib, fn in chains.items()})
        row, beside_s = run(name, batch, theirs, ours, args.repeats, beside)
        bandwidth = probe_bytes / beside_s["read"]
        row["bandwidth_GBps"] = bandwidth / 1e9
        for d in dtypes:
          params = ours[d][1]
          step_bytes = decode_step_bytes(name, params)
          row[f"weights_read_per_step_MB_{d}"] = step_bytes / 1e6
          for lib in ("xla", "torch"):
            row[f"chain_{lib}_ms_{d}"] = 1e3 * beside_s[f"chain_{lib}_{d}"]
          chain_ms = min(row[f"chain_{lib}_ms_{d}"] for lib in ("xla", "torch"))
          row[f"chain_ratio_{d}"] = row[f"ours_{d}_ms_per_token"] / chain_ms
          if batch == 1:
            bound_ms = 1e3 * step_bytes / bandwidth
            row[f"bound_ms_per_token_{d}"] = bound_ms
            row[f"bound_ratio_{d}"] = row[f"ours_{d}_ms_per_token"] / bound_ms
            # transformers' own distance from the bound in the same dtype.
            row[f"hf_bound_ratio_{d}"] = row[f"hf_{d}_ms_per_token"] / bound_ms
            row[f"bound_met_{d}"] = row[f"bound_ratio_{d}"] <= TARGET_BANDWIDTH_RATIO
            row[f"chain_bound_ratio_{d}"] = chain_ms / bound_ms  # the kernels' own distance
          else:
            peaks = gemm_peaks_under_flags(shapes[d], batch, d, flag_sets)
            rates = [v for v in peaks.values() if isinstance(v, float)]
            flops = sum(2 * batch * a * b for a, b in shapes[d])
            row[f"gemm_peaks_GFLOPs_{d}"] = {
              k: (v / 1e9 if isinstance(v, float) else v) for k, v in peaks.items()
            }
            row[f"peak_GFLOPs_{d}"] = max(rates) / 1e9
            for who in ("ours", "hf"):
              rate = flops / (row[f"{who}_{d}_ms_per_token"] / 1e3)
              row[f"{who}_{d}_GFLOPs"] = rate / 1e9
              row[f"{who}_{d}_peak_fraction"] = rate / max(rates)
            row[f"peak_met_{d}"] = row[f"ours_{d}_peak_fraction"] >= TARGET_PEAK_FRACTION
            row[f"chain_peak_fraction_{d}"] = flops / (chain_ms / 1e3) / max(rates)
            # What a step could reach with its products as fast as their chain and its
            # attention reading the KV cache at the bandwidth, nothing else.
            cache_ms = 1e3 * cache_read_bytes(name, ours[d][0], batch, d) / bandwidth
            row[f"cache_read_ms_{d}"] = cache_ms
            row[f"attainable_peak_fraction_{d}"] = (
              flops / ((chain_ms + cache_ms) / 1e3) / max(rates)
            )
        rows.append(row)
        print(json.dumps(row, indent=1, default=str), flush=True)
      del theirs
  print(f"\nXLA_FLAGS of this run: {os.environ.get('XLA_FLAGS', '')!r}")
  cols = ["model", "batch"] + [f"{w}_{d}_ms_per_token" for d in dtypes for w in ("ours", "hf")]
  cols += ["speedup", "ours_best_dtype", "hf_best_dtype", "speedup_met"]
  print(common.table(rows, cols))
  roof = ["model", "batch", "bandwidth_GBps"] + [
    c
    for d in dtypes
    for c in (
      f"bound_ratio_{d}",
      f"hf_bound_ratio_{d}",
      f"chain_bound_ratio_{d}",
      f"chain_ratio_{d}",
      f"peak_GFLOPs_{d}",
      f"ours_{d}_peak_fraction",
      f"hf_{d}_peak_fraction",
      f"chain_peak_fraction_{d}",
      f"attainable_peak_fraction_{d}",
      f"agree_f32_{d}",
      f"agree_hf_{d}",
    )
  ]
  print(common.table(rows, roof))
  common.write_json(
    args.json,
    {
      "benchmark": "decode",
      "machine": common.machine(),
      "prompt": PROMPT,
      "new_tokens": NEW,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
