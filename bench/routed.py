"""Routed decoding (the LLM runs only where a row's router fires) vs the LLM alone, on CPU.

A trained LLM of the demo's task (System 2: the demo's T5, `--llm llm`, or the grown 39M one,
`--llm llm_grown`) with the demo's SLM or LLM-to-SLM hybrid (System 1), greedy, on the first
validation prompts, at batch 1 (one prompt at a time) and batch 8. For each router (`--routers`:
top1 / margin / entropy thresholds, and FS-GEN's SVM router where a study wrote one for that
System 1 against that LLM): BLEU, the LLM-call rate per row and per step, seconds, and the
speedup over the LLM's own greedy decoding, measured side by side after a warm-up (compile time
apart). Speculative decoding with the same System 1 (`--gamma`), which keeps the LLM's output
exactly, runs beside them.

  python bench/routed.py --workdir /tmp/l2s_demo [--llm llm_grown] [--examples 40] \
      [--routers top1:0.5,0.7,0.9] [--svm_dir DIR] [--repeats 3] [--json out.json]

(`python -m l2s_jax.demo --workdir DIR` first; for the SVM routers, a study in --svm_dir:
`python -m l2s_jax.collab.analyze --workdir DIR` writes DIR/collab/svm_router_{slm,hybrid}.json
against the demo LLM; the grown LLM's, see docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import os

from common import alternate, demo_validation, machine, table, write_json  # noqa: E402
from speculative import demo_settings  # noqa: E402


def main(argv=None):
  from l2s_jax import demo_lib, metrics
  from l2s_jax.collab import Routed, svm_router
  from l2s_jax.collab.combine import Router
  from l2s_jax.collab.routed import routed_generate
  from l2s_jax.collab.speculative import speculative_generate
  from l2s_jax.decoding import generate, summarize
  from l2s_jax.eval_lib import hypothesis_text

  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--examples", type=int, default=40)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--llm", default="llm", choices=("llm", "llm_grown"))
  p.add_argument(
    "--routers",
    default="top1:0.5,0.7,0.9",
    help="KIND:T1,T2;KIND:... with KIND top1 | margin | entropy",
  )
  p.add_argument(
    "--svm_dir",
    default="",
    help="a study's directory holding svm_router_{slm,hybrid}.json (default "
    "WORKDIR/collab for --llm llm)",
  )
  p.add_argument("--gamma", type=int, default=4)
  p.add_argument("--systems", default="slm,hybrid")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  pipeline, ids, mask, refs = demo_validation(args.workdir, args.examples)
  eos, n, buckets = demo_settings(pipeline)
  llm, llm_p = demo_lib.load_system(args.workdir, args.llm)
  routers = {}
  for spec in args.routers.split(";"):
    kind, thresholds = spec.split(":")
    routers.update(
      {
        f"{kind}{'<' if kind != 'entropy' else '>'}{t}": Router(kind, float(t))
        for t in thresholds.split(",")
      }
    )
  svm_dir = args.svm_dir or (os.path.join(args.workdir, "collab") if args.llm == "llm" else "")
  rows = []
  for which in args.systems.split(","):
    slm, slm_p = demo_lib.load_system(args.workdir, which)
    svm_file = os.path.join(svm_dir, f"svm_router_{which}.json")
    these = dict(routers)
    if svm_dir and os.path.isfile(svm_file):
      these["svm"] = Router("svm", svm=svm_router.load(svm_file))
    for b in (int(x) for x in args.batches.split(",")):
      chunks = [(ids[i : i + b], mask[i : i + b]) for i in range(0, len(ids), b)]
      extra = lambda m_ids, m_mask: (
        {"llm_input_ids": m_ids, "llm_attention_mask": m_mask} if which == "hybrid" else {}
      )
      outs = {}

      def system(name, fn):
        def run():
          outs[name] = [fn(i, m) for i, m in chunks]

        return run

      fns = {
        "llm": system(
          "llm",
          lambda i, m: generate(
            llm, llm_p, i, m, max_new_tokens=n, eos_id=eos, prompt_buckets=buckets
          ),
        )
      }
      fns["speculative"] = system(
        "speculative",
        lambda i, m: speculative_generate(
          llm,
          llm_p,
          slm,
          slm_p,
          i,
          m,
          max_new_tokens=n,
          gamma=args.gamma,
          eos_id=eos,
          prompt_buckets=buckets,
          slm_extra_inputs=extra(i, m),
        ),
      )
      for name, router in these.items():
        fns[name] = system(
          name,
          lambda i, m, r=router: routed_generate(
            [llm, slm],
            [llm_p, slm_p],
            i,
            m,
            router=r,
            max_new_tokens=n,
            eos_id=eos,
            prompt_buckets=buckets,
            extra_inputs=[{}, extra(i, m)],
          ),
        )
      for fn in fns.values():
        fn()  # compile
      seconds = alternate(fns, args.repeats)
      for name in fns:
        texts = [
          hypothesis_text(pipeline, out.tokens[r], int(out.lengths[r]), eos)
          for out in outs[name]
          for r in range(len(out.lengths))
        ]
        routed = isinstance(outs[name][0].spec, Routed)
        rates = summarize(outs[name][0].spec, outs[name]) if routed else {}
        rows.append(
          {
            "llm": args.llm,
            "system 1": which,
            "batch": b,
            "method": name,
            "bleu": metrics.translation_scores(texts, refs)["bleu"],
            "llm calls/row": rates.get("large_call_rate"),
            "llm steps": rates.get("batch_call_rate"),
            "s": seconds[name],
            "speedup": seconds["llm"] / seconds[name],
          }
        )
  print(
    table(
      rows,
      ["llm", "system 1", "batch", "method", "bleu", "llm calls/row", "llm steps", "s", "speedup"],
    )
  )
  print(machine())
  write_json(args.json, {"machine": machine(), "rows": rows, "examples": len(refs)})
  return rows


if __name__ == "__main__":
  main()
