"""Greedy tokens computed in bfloat16 vs float32 on the demo's trained models.

For each trained system of the default job (the LLM, the SLM, the LLM-to-SLM hybrid) the same
checkpoint is decoded greedily twice, computing in float32 and in bfloat16
(`train.compute_dtype`), on the first validation prompts: the share of generated positions
whose tokens agree (up to the shorter of the two outputs, and counting the length difference as
disagreement), and BLEU in each dtype.

  python bench/bf16_agreement.py --workdir /tmp/l2s_demo [--examples 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import os

from common import bleu, demo_greedy, demo_validation, machine, table, token_agreement, write_json  # noqa: E402

TARGET = 0.99


def main(argv=None):
  from l2s_jax import assemble, demo_lib

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/l2s_demo")
  p.add_argument("--examples", type=int, default=300)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  pipeline, ids, mask, refs = demo_validation(args.workdir, args.examples)
  eos = pipeline.tokenizer.eos_id
  rows = []
  for which in demo_lib.SYSTEMS:
    outs = {}
    for dtype in ("float32", "bfloat16"):
      c = demo_lib.system_config(which, args.workdir)
      c.train.compute_dtype = dtype
      model, params = assemble.load_trained(c, os.path.join(args.workdir, which))
      outs[dtype] = demo_greedy(c, model, params, ids, mask, eos)
    agree, total = token_agreement(outs["float32"], outs["bfloat16"])
    bleu_of = {d: bleu(pipeline, o, refs) for d, o in outs.items()}
    rows.append(
      {
        "system": which,
        "token_agreement": agree / total,
        "target_met": agree / total >= TARGET,
        "bleu_float32": bleu_of["float32"],
        "bleu_bfloat16": bleu_of["bfloat16"],
        "tokens": total,
      }
    )
  print(table(rows, list(rows[0])))
  print(machine())
  write_json(
    args.json, {"machine": machine(), "examples": len(refs), "target": TARGET, "rows": rows}
  )
  return rows


if __name__ == "__main__":
  main()
