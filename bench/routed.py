"""Routed decoding (the LLM runs only where a row's router fires) vs the LLM alone, on CPU.

The demo's trained LLM (System 2) with the demo's SLM or LLM-to-SLM hybrid (System 1), greedy,
on the first validation prompts, at batch 1 (one prompt at a time) and batch 8. For each router
(top-1 thresholds, FS-GEN's SVM router when the analysis wrote one): BLEU, the LLM-call rate per
row and per step, seconds, and the speedup over the LLM's own greedy decoding, measured side by
side after a warm-up (compile time apart). Speculative decoding with the same System 1 (gamma 4),
which keeps the LLM's output exactly, runs beside them.

  python bench/routed.py --workdir /tmp/l2s_demo [--examples 40] [--repeats 3] [--json out.json]

(`python -m l2s_jax.demo --workdir DIR` first; `python -m l2s_jax.collab.analyze --workdir DIR`
for the SVM router.)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from common import alternate, machine, table, write_json  # noqa: E402
from speculative import demo_prompts  # noqa: E402


def main(argv=None):
  from l2s_jax import assemble, demo_lib, metrics
  from l2s_jax.collab import svm_router
  from l2s_jax.collab.combine import Router
  from l2s_jax.collab.routed import routed_generate
  from l2s_jax.collab.speculative import speculative_generate
  from l2s_jax.decoding import generate
  from l2s_jax.eval_lib import hypothesis_text, prompt_batch
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--examples", type=int, default=40)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--thresholds", default="0.5,0.7,0.9")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  ids, mask, eos, n, buckets = demo_prompts(args.workdir, args.examples)
  cfg = demo_lib.system_config("llm")
  pipeline = assemble.data_pipeline(cfg, os.path.join(args.workdir, "llm"), batch_size=1,
                                    training=False)
  refs = prompt_batch(pipeline, "validation", args.examples)[2]
  llm, llm_p = demo_lib.load_system(args.workdir, "llm")
  routers = {f"top1<{t}": Router("top1", float(t)) for t in args.thresholds.split(",")}
  svm_file = os.path.join(args.workdir, "collab", "svm_router.json")
  if os.path.isfile(svm_file):
    routers["svm"] = Router("svm", svm=svm_router.load(svm_file))
  rows = []
  for which in ("slm", "hybrid"):
    slm, slm_p = demo_lib.load_system(args.workdir, which)
    for b in (int(x) for x in args.batches.split(",")):
      chunks = [(ids[i:i + b], mask[i:i + b]) for i in range(0, len(ids), b)]
      extra = lambda m_ids, m_mask: ({"llm_input_ids": m_ids, "llm_attention_mask": m_mask}
                                     if which == "hybrid" else {})
      outs = {}

      def system(name, fn):
        def run():
          outs[name] = [fn(i, m) for i, m in chunks]
        return run

      fns = {"llm": system("llm", lambda i, m: generate(
          llm, llm_p, i, m, max_new_tokens=n, eos_id=eos, prompt_buckets=buckets))}
      fns["speculative"] = system("speculative", lambda i, m: speculative_generate(
          llm, llm_p, slm, slm_p, i, m, max_new_tokens=n, gamma=4, eos_id=eos,
          prompt_buckets=buckets, slm_extra_inputs=extra(i, m)))
      for name, router in routers.items():
        fns[name] = system(name, lambda i, m, r=router: routed_generate(
            [llm, slm], [llm_p, slm_p], i, m, router=r, max_new_tokens=n, eos_id=eos,
            prompt_buckets=buckets, extra_inputs=[{}, extra(i, m)]))
      for fn in fns.values():
        fn()                                                    # compile
      seconds = alternate(fns, args.repeats)
      for name in fns:
        texts, used, calls, steps, tokens = [], 0, 0.0, 0.0, 0
        for out in outs[name]:
          texts += [hypothesis_text(pipeline, out.tokens[r], int(out.lengths[r]), eos)
                    for r in range(len(out.lengths))]
          if hasattr(out, "batch_calls"):
            valid = out.valid()
            used += int(out.llm_used[valid].sum())
            tokens += int(valid.sum())
            s = int(out.lengths.max())
            calls += float(out.batch_calls[:s].sum())
            steps += s
        rows.append({"system 1": which, "batch": b, "method": name,
                     "bleu": metrics.translation_scores(texts, refs)["bleu"],
                     "llm calls/row": used / tokens if tokens else None,
                     "llm steps": calls / steps if steps else None,
                     "s": seconds[name], "speedup": seconds["llm"] / seconds[name]})
  print(table(rows, ["system 1", "batch", "method", "bleu", "llm calls/row", "llm steps", "s",
                     "speedup"]))
  print(machine())
  write_json(args.json, {"machine": machine(), "rows": rows, "examples": len(refs)})
  return rows


if __name__ == "__main__":
  main()
