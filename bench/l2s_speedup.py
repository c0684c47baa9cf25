"""End-to-end generation latency: an LLM encoder-decoder vs LLM-to-SLM.

LLM: T5-large shape (random weights). LLM-to-SLM: the same T5-large encoder,
frozen, + projector + a T5-small-shape SLM. Same prompts (64 tokens), exactly
64 new tokens (no EOS), batch 1 and 16; the systems run alternately after a
warm-up, compile time is reported apart, and the LLM-to-SLM time is split
into the LLM-encoder prefill and the SLM's decoding.

  python bench/l2s_speedup.py [--json out.json] [--repeats 3] [--batches 1,16]
      [--dtype float32|bfloat16]   (weights stored and computed in it)
"""

from __future__ import annotations

import argparse

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax import assemble  # noqa: E402
from l2s_jax.decoding import generate  # noqa: E402

PROMPT, NEW = 64, 64
TARGETS = {1: 6.0, 16: 4.0}  # speedup by batch size (issue #21)


def build(llm_preset: str, slm_preset: str, dtype: str):
  """The LLM (a plain preset) and LLM-to-SLM on its encoder, through the assembly layer."""
  llm_run = assemble.initial(common.preset_config(llm_preset, dtype=dtype))
  hybrid_run = assemble.initial(common.preset_config(slm_preset, llm=llm_preset, dtype=dtype))
  # The hybrid reads the LLM's own encoder arrays (no second copy); projector and SLM are new.
  llm_params = llm_run.params
  hybrid_params = {
    **hybrid_run.trainable,
    "llm": {"shared": llm_params["shared"], "encoder": llm_params["encoder"]},
  }
  return llm_run.model, llm_params, hybrid_run.model, hybrid_params


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--llm", default="t5-large")
  parser.add_argument("--slm", default="t5-small")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args()
  llm, llm_params, hybrid, hybrid_params = build(args.llm, args.slm, args.dtype)
  encode = jax.jit(
    lambda p, i, m: hybrid.apply({"params": p}, i, m, method=hybrid.project_llm_states)
  )
  rows = []
  for batch in [int(b) for b in args.batches.split(",")]:
    rng = np.random.RandomState(batch)
    ids = rng.randint(5, 32000, (batch, PROMPT)).astype(np.int32)
    mask = np.ones_like(ids)
    extra = {"llm_input_ids": ids, "llm_attention_mask": mask}

    def run_llm(n=NEW):
      return np.asarray(
        generate(
          llm, llm_params, ids, mask, max_new_tokens=n, eos_id=None, prompt_buckets=None
        ).tokens
      )

    def run_hybrid(n=NEW):
      return np.asarray(
        generate(
          hybrid,
          hybrid_params,
          ids,
          mask,
          max_new_tokens=n,
          eos_id=None,
          prompt_buckets=None,
          extra_inputs=extra,
        ).tokens
      )

    def run_prefill():
      return np.asarray(encode(hybrid_params, ids, mask))

    compile_s = {}
    for name, fn in (("llm", run_llm), ("hybrid", run_hybrid), ("prefill", run_prefill)):
      first = common.timed(fn)
      compile_s[name] = first - common.timed(fn)
    run_hybrid(1)
    assert run_llm().shape == run_hybrid().shape == (batch, NEW)
    t = common.alternate(
      {
        "llm": run_llm,
        "hybrid": run_hybrid,
        "prefill": run_prefill,
        "hybrid_1": lambda: run_hybrid(1),
      },
      args.repeats,
    )
    row = {
      "batch": batch,
      "llm_s": t["llm"],
      "hybrid_s": t["hybrid"],
      "speedup": t["llm"] / t["hybrid"],
      "hybrid_llm_encoder_prefill_s": t["prefill"],
      "hybrid_slm_decode_s": t["hybrid"] - t["prefill"],
      "slm_ms_per_token": 1e3 * (t["hybrid"] - t["hybrid_1"]) / (NEW - 1),
      "llm_tokens_per_s": batch * NEW / t["llm"],
      "hybrid_tokens_per_s": batch * NEW / t["hybrid"],
      "compile_llm_s": compile_s["llm"],
      "compile_hybrid_s": compile_s["hybrid"],
    }
    if batch in TARGETS:
      row["target_speedup"] = TARGETS[batch]
      row["met"] = row["speedup"] >= TARGETS[batch]
    rows.append(row)
    print(common.table([row], list(row)), flush=True)
  print(
    f"\n{args.llm} encoder-decoder vs LLM-to-SLM ({args.llm} encoder + {args.slm}), "
    f"prompt {PROMPT}, {NEW} new tokens, {args.dtype}"
  )
  print(
    common.table(
      rows,
      [
        "batch",
        "llm_s",
        "hybrid_s",
        "speedup",
        "hybrid_llm_encoder_prefill_s",
        "hybrid_slm_decode_s",
        "llm_tokens_per_s",
        "hybrid_tokens_per_s",
      ],
    )
  )
  common.write_json(
    args.json,
    {
      "benchmark": "l2s_speedup",
      "machine": common.machine(),
      "llm": args.llm,
      "slm": args.slm,
      "dtype": args.dtype,
      "prompt": PROMPT,
      "new_tokens": NEW,
      "rows": rows,
    },
  )


if __name__ == "__main__":
  main()
