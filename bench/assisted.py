"""Speculative decoding against transformers' assisted generation, and batched, on CPU.

One pair of the demo's task: the LLM (`--llm`, default the grown 39M `llm_grown`, a step of
which reads ~155 MB of weights) verifying, the demo's trained SLM (`--draft slm`) drafting.
Both are exported as transformers directories (WORKDIR/<name>/transformers, written when
missing), so transformers runs the very same weights.

Batch 1, one validation prompt at a time, greedy, stop at EOS:
  ours     the LLM's greedy `generate`, and `speculative_generate` at --gamma;
  theirs   the LLM's `generate`, and `generate(assistant_model=SLM)` in float32 and bfloat16,
           under three assistant settings: transformers' default (20 drafts, stop drafting
           below confidence 0.4), a constant --gamma drafts (no confidence stop), and the
           heuristic schedule (start at --gamma, +2 after a full acceptance, -1 otherwise);
           the comparison is against the fastest of those six.
Batches 8 and 32 (--batches), ours only: the LLM's batched greedy vs batched speculative
decoding with each draft in --batched_drafts (slm; hybrid = the demo's LLM-to-SLM, which
reads the prompt through the demo LLM's frozen encoder); beside each measured speedup, the one
predicted from costs measured at that batch size: Leviathan et al.'s expected tokens per
iteration (1 - alpha^(g+1)) / (1 - alpha) over the iteration's cost in LLM steps (a verify pass
over g + 1 tokens and g draft steps, each timed alone in a compiled loop; `pass_costs`), and
`predicted_batch`, the same costs with the loops' own counts: a batched loop runs until its last
row is done, so greedy takes the longest row's steps and speculative decoding the iterations of
its slowest row (greedy steps / (iterations x iteration cost)).

Tokens: every speculative output is checked against the same library's greedy output, and
ours against transformers' (float32).

  python bench/assisted.py --workdir /tmp/l2s_demo [--llm llm_grown] [--gamma 4]
      [--examples 32] [--batches 8,32] [--batched_drafts slm,hybrid] [--json out.json]
  (--batches '' runs batch 1 only)

(`python -m l2s_jax.demo --workdir DIR` first; the grown LLM: bench/grow_llm.py, then
configs/demo.py:llm_grown, see docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import copy
import os

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import common  # noqa: E402
from speculative import demo_prompts, pass_costs  # noqa: E402

TARGET_VS_ASSISTED = 2.0  # ours speculative / transformers' best assisted, batch 1
TARGET_BATCHED = 1.5  # batched speculative / the LLM's batched greedy, batch 8
TARGET_PREDICTION = 0.85  # measured / predicted from measured costs

HF_SETTINGS = {  # name -> the assistant's generation settings
  "default": {},
  "constant": {"num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0},
  "heuristic": {"num_assistant_tokens_schedule": "heuristic"},
}


def transformers_pair(workdir: str, llm: str, draft: str, dtype: str):
  """(LLM, assistant) as transformers models in `dtype`, read from the workdirs' exports."""
  from l2s_jax import assemble

  out = []
  for name in (llm, draft):
    wd = os.path.join(workdir, name)
    path = assemble.export_plain(assemble.config_from_workdir(wd), wd)
    m = tf.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    m.to(common.torch_device())
    # transformers 5.x sizes generate's KV cache by the encoder's layer count (num_layers); the
    # demo's T5s have more decoder layers. The modules are built, so this only sizes the cache.
    m.config.num_layers = m.config.num_decoder_layers
    out.append(m)
  return out


def hf_runner(model, assistant, prompts, max_new, eos, setting: str | None, gamma: int):
  """f() -> [token arrays], one prompt at a time; `setting` None: the LLM alone."""
  if assistant is not None:
    assistant = copy.deepcopy(assistant)
    g = assistant.generation_config
    g.num_assistant_tokens = gamma if setting != "default" else 20
    for k, v in HF_SETTINGS[setting].items():
      setattr(g, k, v)

  def run():
    outs = []
    with torch.no_grad():
      for ids in prompts:
        t = torch.tensor(ids[None]).to(common.torch_device())
        kw = {"assistant_model": assistant} if assistant is not None else {}
        o = model.generate(
          input_ids=t,
          attention_mask=torch.ones_like(t),
          do_sample=False,
          max_new_tokens=max_new,
          eos_token_id=eos,
          pad_token_id=0,
          **kw,
        )
        outs.append(o[0, 1:].cpu().numpy())  # drop the decoder start token
    return outs

  return run


def trimmed(tokens, eos) -> list[int]:
  """A row's tokens up to and including EOS."""
  tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
  return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def batch1(args, llm, llm_params, slm, slm_params, ids, mask, eos, max_new, buckets):
  from l2s_jax.collab.speculative import speculative_generate
  from l2s_jax.decoding import generate

  n = ids.shape[0]
  prompts = [ids[r, : int(mask[r].sum())] for r in range(n)]  # right-padded prompts

  def ours_greedy():
    return [
      np.asarray(
        generate(
          llm,
          llm_params,
          ids[r : r + 1],
          mask[r : r + 1],
          max_new_tokens=max_new,
          eos_id=eos,
          prompt_buckets=buckets,
        ).tokens
      )
      for r in range(n)
    ]

  def ours_spec():
    return [
      speculative_generate(
        llm,
        llm_params,
        slm,
        slm_params,
        ids[r : r + 1],
        mask[r : r + 1],
        max_new_tokens=max_new,
        gamma=args.gamma,
        eos_id=eos,
        prompt_buckets=buckets,
      )
      for r in range(n)
    ]

  systems = {"ours LLM greedy": ours_greedy, f"ours speculative g={args.gamma}": ours_spec}
  for dtype in ("float32", "bfloat16"):
    big, small = transformers_pair(args.workdir, args.llm, args.draft, dtype)
    systems[f"HF LLM greedy {dtype}"] = hf_runner(big, None, prompts, max_new, eos, None, 0)
    for s in HF_SETTINGS:
      systems[f"HF assisted {s} {dtype}"] = hf_runner(
        big, small, prompts, max_new, eos, s, args.gamma
      )
  outputs = {k: fn() for k, fn in systems.items()}  # warm-up, compiles
  seconds = common.alternate(systems, args.repeats)
  rows_of = {
    k: [trimmed(getattr(o, "tokens", o), eos) for o in outs] for k, outs in outputs.items()
  }
  reference = rows_of["ours LLM greedy"]
  tokens = sum(len(r) for r in reference)
  rows = []
  for k in systems:
    same = sum(a == b for a, b in zip(rows_of[k], reference))
    rows.append(
      {
        "system": k,
        "seconds": seconds[k],
        "tokens_per_s": tokens / seconds[k],
        "rows_identical_to_ours_greedy": f"{same}/{n}",
      }
    )
  assisted = {k: v for k, v in seconds.items() if k.startswith("HF assisted")}
  best_hf = min(assisted, key=assisted.get)
  spec = f"ours speculative g={args.gamma}"
  for r in rows:
    r["vs_best_HF_assisted"] = seconds[best_hf] / r["seconds"]
  hf_greedy = {k: v for k, v in seconds.items() if k.startswith("HF LLM greedy")}
  best_hf_greedy = min(hf_greedy, key=hf_greedy.get)
  summary = {
    "examples": n,
    "tokens": tokens,
    "best_hf_assisted": best_hf,
    "ours_vs_best_hf_assisted": seconds[best_hf] / seconds[spec],
    "ours_spec_vs_ours_greedy": seconds["ours LLM greedy"] / seconds[spec],
    "hf_assisted_vs_hf_greedy": seconds[best_hf_greedy] / seconds[best_hf],
    "best_hf_greedy": best_hf_greedy,
    "ours_greedy_vs_best_hf_greedy": seconds[best_hf_greedy] / seconds["ours LLM greedy"],
  }
  return rows, summary


def batched(args, llm, llm_params, drafts, ids, mask, eos, max_new, buckets):
  from l2s_jax.collab.speculative import expected_speedup, speculative_generate
  from l2s_jax.decoding import generate, summarize

  rows = []
  for b in [int(x) for x in args.batches.split(",") if x]:
    n = ids.shape[0] // b * b
    if n == 0:
      raise SystemExit(f"--examples {ids.shape[0]} < batch {b}")
    chunks = [(ids[i : i + b], mask[i : i + b]) for i in range(0, n, b)]

    def greedy(chunks=chunks):
      outs = [
        generate(llm, llm_params, i, k, max_new_tokens=max_new, eos_id=eos, prompt_buckets=buckets)
        for i, k in chunks
      ]
      return [(np.asarray(o.tokens), np.asarray(o.lengths)) for o in outs]

    systems = {"LLM greedy": greedy}
    for name, (m, p, extra) in drafts.items():
      systems[f"speculative {name}"] = lambda m=m, p=p, extra=extra, chunks=chunks: [
        speculative_generate(
          llm,
          llm_params,
          m,
          p,
          i,
          k,
          max_new_tokens=max_new,
          gamma=args.gamma,
          eos_id=eos,
          prompt_buckets=buckets,
          slm_extra_inputs=extra(i, k),
        )
        for i, k in chunks
      ]
    outputs = {k: fn() for k, fn in systems.items()}
    seconds = common.alternate(systems, args.repeats)
    reference = [t for t, _ in outputs["LLM greedy"]]
    # Both batched loops run until their last row is done: greedy takes the longest row's
    # steps, speculative as many iterations as its slowest row needs.
    greedy_steps = sum(int(lengths.max()) for _, lengths in outputs["LLM greedy"])
    llm_pass = pass_costs(llm, llm_params, ids[:b], mask[:b], [args.gamma + 1])
    rows.append(
      {"batch": b, "system": "LLM greedy", "seconds": seconds["LLM greedy"], "speedup": 1.0}
    )
    for name, (m, p, extra) in drafts.items():
      outs = outputs[f"speculative {name}"]
      same = all(np.array_equal(o.tokens, t) for o, t in zip(outs, reference))
      stats = summarize(outs[0].spec, outs)
      alpha = stats["acceptance_rate"]
      slm_pass = pass_costs(m, p, ids[:b], mask[:b], [2], extra=extra(ids[:b], mask[:b]))
      v = llm_pass[args.gamma + 1] / llm_pass[1]
      draft_steps = (slm_pass[2] + (args.gamma - 1) * slm_pass[1]) / llm_pass[1]
      predicted = expected_speedup(alpha, args.gamma, 0.0) / (v + draft_steps)
      # The same costs with the loops' own counts: greedy steps over iterations x their cost.
      iterations = stats["iterations"]
      predicted_batch = greedy_steps / (iterations * (v + draft_steps))
      speedup = seconds["LLM greedy"] / seconds[f"speculative {name}"]
      rows.append(
        {
          "batch": b,
          "system": f"speculative {name} g={args.gamma}",
          "seconds": seconds[f"speculative {name}"],
          "speedup": speedup,
          "alpha": alpha,
          "verify_steps": v,
          "draft_steps": draft_steps,
          "predicted": predicted,
          "measured/predicted": speedup / predicted,
          "greedy_steps": greedy_steps,
          "iterations": iterations,
          # what the loops would take if every row needed the mean row's
          # iterations (llm_calls counts the prefill too)
          "mean_row_iterations": (stats["large_calls"] - b * len(outs)) / b,
          "predicted_batch": predicted_batch,
          "measured/predicted_batch": speedup / predicted_batch,
          "identical": same,
        }
      )
    jax.clear_caches()
  return rows


def main(argv=None):
  from l2s_jax.demo_lib import load_system

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/l2s_demo")
  p.add_argument("--llm", default="llm_grown")
  p.add_argument("--draft", default="slm", help="a plain trained SLM (transformers can load it)")
  p.add_argument("--gamma", type=int, default=4)
  p.add_argument("--examples", type=int, default=32)
  p.add_argument("--batches", default="8,32")
  p.add_argument("--batched_drafts", default="slm,hybrid")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  ids, mask, eos, max_new, buckets = demo_prompts(args.workdir, args.examples)
  ids, mask = np.asarray(ids), np.asarray(mask)
  llm, llm_params = load_system(args.workdir, args.llm)
  slm, slm_params = load_system(args.workdir, args.draft)
  print(common.machine())
  rows1, summary = batch1(args, llm, llm_params, slm, slm_params, ids, mask, eos, max_new, buckets)
  print(
    f"\nbatch 1: {summary['examples']} prompts one at a time, {summary['tokens']} tokens; "
    f"LLM {args.llm}, draft {args.draft}"
  )
  print(
    common.table(
      rows1,
      ["system", "seconds", "tokens_per_s", "vs_best_HF_assisted", "rows_identical_to_ours_greedy"],
    )
  )
  print(
    f"ours speculative vs transformers' best assisted generation ({summary['best_hf_assisted']}): "
    f"{summary['ours_vs_best_hf_assisted']:.2f}x (target >= {TARGET_VS_ASSISTED}x)"
  )
  jax.clear_caches()
  drafts = {}
  for name in [d for d in args.batched_drafts.split(",") if d]:
    if name == "hybrid":
      m, pp = load_system(args.workdir, "hybrid")
      extra = lambda i, k: {"llm_input_ids": i, "llm_attention_mask": k}  # one tokenizer
    else:
      (m, pp), extra = load_system(args.workdir, name), (lambda i, k: {})
    drafts[name] = (m, pp, extra)
  rows_b = batched(args, llm, llm_params, drafts, ids, mask, eos, max_new, buckets)
  if rows_b:
    print("\nbatched (ours): speculative vs the LLM's own batched greedy")
    print(
      common.table(
        rows_b,
        [
          "batch",
          "system",
          "seconds",
          "speedup",
          "alpha",
          "verify_steps",
          "draft_steps",
          "predicted",
          "measured/predicted",
          "greedy_steps",
          "iterations",
          "mean_row_iterations",
          "predicted_batch",
          "measured/predicted_batch",
          "identical",
        ],
      )
    )
  common.write_json(
    args.json,
    {
      "machine": common.machine(),
      "args": vars(args),
      "batch1": rows1,
      "summary": summary,
      "batched": rows_b,
    },
  )


if __name__ == "__main__":
  main()
