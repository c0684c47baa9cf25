"""Prefill time and memory: the prompt in chunks (the default) against one whole call.

A decoder-only prefill runs the prompt through the blocks in chunks of at most
`causal_lm.PREFILL_CHUNK_TOKENS` tokens (batch x positions). This times the model's `prefill`
(random weights of a preset; first logits and the cache) in three settings, side by side
(A B C A B C ..., medians): whole (one call of the blocks), the default chunking (at batch 1 a
prompt of up to 4096 positions is one call), and chunks of half as many positions as the
default's (or the prompt's, where the default is one call). It also reads XLA's temporary
bytes of each compiled call (`memory_analysis()`: the activations; the cache is the call's
output, not counted). First logits must agree (max |difference| printed).

  python bench/prefill.py [--model gpt2] [--batches 1,32] [--prompt 512] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
from unittest import mock

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax import assemble  # noqa: E402
from l2s_jax.models import causal_lm  # noqa: E402


def compiled_prefill(model, params, ids, mask, max_len: int, chunk_tokens: int):
  """The jitted prefill, traced with `chunk_tokens` per chunk (the module reads it at trace
  time); returns (call, XLA's temporary bytes)."""
  fn = jax.jit(
    lambda p, i, m: model.apply({"params": p}, i, m, max_len=max_len, method=model.prefill)
  )
  with (
    mock.patch.object(causal_lm, "PREFILL_CHUNK_TOKENS", chunk_tokens),
    mock.patch.object(causal_lm, "PREFILL_MIN_CHUNK", 1),
  ):
    compiled = fn.lower(params, ids, mask).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return (lambda: jax.block_until_ready(compiled(params, ids, mask))), temp


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="gpt2")
  ap.add_argument("--batches", default="1,32")
  ap.add_argument("--prompt", type=int, default=512)
  ap.add_argument("--new", type=int, default=512, help="cache slots beyond the prompt")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  run = assemble.initial(common.preset_config(args.model))
  model, params = run.compute_model, run.params
  if not isinstance(model, causal_lm.CausalLMMixin):
    raise SystemExit(
      f"--model {args.model!r}: not a decoder-only model (T5's prefill is its "
      "encoder, which is not chunked)"
    )
  default = causal_lm.PREFILL_CHUNK_TOKENS
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(5, 1000, (batch, args.prompt)), jnp.int32)
    mask = jnp.ones_like(ids)
    max_len = args.prompt + args.new
    whole_chunk = batch * args.prompt
    default_positions = model.prefill_chunk_length(batch)
    half = max(min(default_positions, args.prompt) // 2, 1)  # positions
    settings = {"whole": whole_chunk, "default": default, "half": batch * half}
    fns, temps, logits = {}, {}, {}
    for name, chunk_tokens in settings.items():
      fns[name], temps[name] = compiled_prefill(model, params, ids, mask, max_len, chunk_tokens)
      logits[name] = np.asarray(fns[name]()[0])
    times = common.alternate(fns, args.repeats)
    row = {
      "model": args.model,
      "batch": batch,
      "prompt": args.prompt,
      "cache_slots": max_len,
      "default_chunk_positions": min(default_positions, args.prompt),
      "max_abs_logit_diff": max(float(np.abs(logits[k] - logits["whole"]).max()) for k in settings),
    }
    for name in settings:
      row[f"{name}_s"] = times[name]
      row[f"{name}_temp_MiB"] = temps[name] / 2**20
    row["default_vs_whole_time"] = times["default"] / times["whole"]
    rows.append(row)
    print(
      f"{args.model} batch {batch}, prompt {args.prompt} (default chunk "
      f"{row['default_chunk_positions']} positions): "
      + "  ".join(f"{k} {times[k]:.2f} s / {temps[k] / 2**20:.0f} MiB" for k in settings)
      + f"  default/whole time {row['default_vs_whole_time']:.2f}"
      + f"  max |dlogits| {row['max_abs_logit_diff']:.1e}",
      flush=True,
    )
  common.write_json(args.json, {"benchmark": "prefill", "machine": common.machine(), "rows": rows})


if __name__ == "__main__":
  main()
