"""Writes the demo's trained LLM grown to configs/demo.py:llm_wide's shapes: the init of
configs/demo.py:llm_grown (see there), a transformers directory DIR/llm_grown_init.

Every feed-forward block gets 16384 hidden units: the new input columns random, the
new output rows zero (Net2WiderNet-style), so the grown model computes the trained
LLM's function exactly; checked here on the greedy outputs of validation prompts.

  python bench/grow_llm.py --workdir /tmp/l2s_demo [--prompts 30]
"""

from __future__ import annotations

import argparse
import os

import numpy as np  # noqa: E402

from l2s_jax import demo_lib, hf  # noqa: E402
from l2s_jax.decoding import generate  # noqa: E402
from l2s_jax.models.surgery import widen_ffn  # noqa: E402
from speculative import demo_prompts  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="/tmp/l2s_demo")
  ap.add_argument("--prompts", type=int, default=30)
  args = ap.parse_args()
  out = os.path.join(args.workdir, "llm_grown_init")
  if os.path.exists(out):
    raise SystemExit(f"{out} exists; remove it to grow the LLM again")
  llm, params = demo_lib.load_system(args.workdir, "llm")
  d_ff = demo_lib.system_config("llm_grown").slm.overrides.d_ff
  grown, grown_params = widen_ffn(llm, params, d_ff, out_scale=0.0)
  ids, mask, eos, max_new, buckets = demo_prompts(args.workdir, args.prompts)
  for r in range(ids.shape[0]):
    a, b = (
      np.asarray(
        generate(
          m,
          p,
          ids[r : r + 1],
          mask[r : r + 1],
          max_new_tokens=max_new,
          eos_id=eos,
          prompt_buckets=buckets,
        ).tokens
      )
      for m, p in ((llm, params), (grown, grown_params))
    )
    if not np.array_equal(a, b):
      raise SystemExit(f"prompt {r}: the grown LLM's greedy output differs from the LLM's")
  hf.save(grown, grown_params, out)
  print(
    f"{out}: d_ff {llm.config.d_ff} -> {d_ff}, greedy outputs equal the trained LLM's "
    f"on {ids.shape[0]} prompts"
  )


if __name__ == "__main__":
  main()
