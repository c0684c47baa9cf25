"""The KV-cache copies XLA:CPU made in every batch-1 decoding step, before and after, in one run.

Until 2026-12-02 `layers.update_layer_cache` wrote each step's keys and values with a scatter
that indexed rows of the 4-D [B, K, H, S] cache array. At batch 1 XLA:CPU bitcasts the unit
batch axis away around that scatter, and copy insertion then copied every cache array four
times per step. The write now scatters into a [B*K, ...] view of the same array (a free
reshape), and the loop body copies no cache array.

This script compiles greedy decoding at batch 1 both ways (the old write restored by patching
the function while tracing), counts the copies of cache arrays and the kernels (every op that
does work: fusions, dots, copies, ...) in the while-loop body of the optimized HLO, and times
both executables alternately: ms per token (64 new tokens after a prompt of each length in
--prompts, less a 1-token call) beside the bandwidth bound of the weights a step reads, the
bandwidth measured by a 1 GiB read timed in the same alternation (on a shared VM the machine's
speed drifts within minutes). The copies grow with the cache (GPT-2: prompt + 64 slots; T5: the
decoder's 65 whatever the prompt), the weights' bound does not.

  python bench/cache_copies.py [--json out.json] [--repeats 7] [--models t5-small,gpt2]
      [--prompts 64,960]
"""

from __future__ import annotations

import argparse
import collections
import functools
import re

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
import decode  # noqa: E402
from l2s_jax import assemble  # noqa: E402
from l2s_jax.decoding import Greedy, Sample, front  # noqa: E402
from l2s_jax.decoding.request import model_vocab_size  # noqa: E402
from l2s_jax.decoding.spec import Inputs  # noqa: E402
from l2s_jax.models import layers  # noqa: E402

NEW = 64


FREE_OPS = ("get-tuple-element", "bitcast", "constant", "tuple", "parameter")


def loop_body(hlo: str, min_elements: int) -> tuple[collections.Counter, collections.Counter]:
  """({shape: count} of the copies of at least `min_elements` elements, {op: count} of the
  kernels (every op but FREE_OPS)) in the while-loop bodies of a compiled module."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  copies, kernels, current = collections.Counter(), collections.Counter(), None
  for line in hlo.splitlines():
    head = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
    elif current in bodies:
      op = re.search(r"= (\S+) ([a-z\-]+)\(", line)
      if op is None or op.group(2) in FREE_OPS:
        continue
      kernels[op.group(2)] += 1
      shape = op.group(1)
      if op.group(2) == "copy":
        dims = [int(d) for d in re.findall(r"\d+", shape.split("[")[1].split("]")[0])]
        if int(np.prod(dims)) >= min_elements:
          copies[shape.split("{")[0]] += 1
  return copies, kernels


def compile_greedy(model, params, ids, mask, n: int, cache_len: int):
  """A fresh executable of greedy decoding (`decoding.front.decode_core`), traced with whatever write is in place."""
  # A new partial each time: jax.jit caches traces by function, so one jit of decode_core
  # would reuse the first variant's trace for the second.
  fn = jax.jit(
    functools.partial(
      front.decode_core,
      spec=Sample(Greedy()),
      models=(model,),
      max_new_tokens=n,
      vocab=model_vocab_size(model),
    )
  )
  inputs = Inputs(ids, mask, ({},), jnp.zeros((0,), jnp.int32), jnp.int32(0), (cache_len,))
  return fn.lower((params,), inputs, jax.random.PRNGKey(0), ()).compile()


def run(name: str, prompt: int, repeats: int) -> dict:
  c = common.preset_config(name)
  built = assemble.initial(c)
  model, params = built.compute_model, built.params
  ids = jnp.asarray(np.random.RandomState(0).randint(5, 1000, (1, prompt)), jnp.int32)
  mask = jnp.ones_like(ids)
  cache_len = model.cache_length(prompt, NEW)  # what generate sizes
  cache = jax.eval_shape(lambda: model.init_cache(1, cache_len))["layers"][0]["v"]
  row = {
    "model": name,
    "batch": 1,
    "prompt": prompt,
    "cache_array": "x".join(map(str, cache.shape)),
  }
  fns, tokens = {}, {}
  for variant, update in (("before", layers.write_rows), ("after", layers.update_layer_cache)):
    saved, layers.update_layer_cache = layers.update_layer_cache, update
    try:
      full = compile_greedy(model, params, ids, mask, NEW, cache_len)
      one = compile_greedy(model, params, ids, mask, 1, cache_len)
    finally:
      layers.update_layer_cache = saved
    copies, kernels = loop_body(full.as_text(), int(np.prod(cache.shape)))
    row[f"copies_per_step_{variant}"] = sum(copies.values())
    row[f"kernels_per_step_{variant}"] = sum(kernels.values())
    row[f"dots_per_step_{variant}"] = kernels["dot"]
    inputs = Inputs(ids, mask, ({},), jnp.zeros((0,), jnp.int32), jnp.int32(0), (cache_len,))
    call = lambda f: jax.block_until_ready(f((params,), inputs, jax.random.PRNGKey(0), ()))
    tokens[variant] = np.asarray(call(full)["tokens"])
    fns[variant] = lambda f=full: call(f)
    fns[f"{variant}_1"] = lambda f=one: call(f)
  fns["read"], nbytes = common.bandwidth_probe()
  times = common.alternate(fns, repeats)
  row["bandwidth_GBps"] = nbytes / times["read"] / 1e9
  bound_ms = 1e3 * decode.decode_step_bytes(name, params) / (nbytes / times["read"])
  row["bound_ms_per_token"] = bound_ms
  for variant in ("before", "after"):
    ms = 1e3 * (times[variant] - times[f"{variant}_1"]) / (NEW - 1)
    row[f"ms_per_token_{variant}"] = ms
    row[f"bound_ratio_{variant}"] = ms / bound_ms
  row["speedup"] = row["ms_per_token_before"] / row["ms_per_token_after"]
  row["identical_tokens"] = bool((tokens["before"] == tokens["after"]).all())
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--models", default="t5-small,gpt2")
  parser.add_argument("--prompts", default="64,960")
  args = parser.parse_args()
  rows = [
    run(name, int(prompt), args.repeats)
    for prompt in args.prompts.split(",")
    for name in args.models.split(",")
  ]
  print(
    common.table(
      rows,
      [
        "model",
        "prompt",
        "cache_array",
        "copies_per_step_before",
        "copies_per_step_after",
        "kernels_per_step_after",
        "dots_per_step_after",
        "ms_per_token_before",
        "ms_per_token_after",
        "speedup",
        "bandwidth_GBps",
        "bound_ms_per_token",
        "bound_ratio_before",
        "bound_ratio_after",
        "identical_tokens",
      ],
    )
  )
  common.write_json(
    args.json, {"benchmark": "cache_copies", "machine": common.machine(), "rows": rows}
  )


if __name__ == "__main__":
  main()
