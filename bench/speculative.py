"""Speculative greedy decoding vs the LLM's own greedy decoding, on CPU.

Pairs:
  demo      the demo's trained LLM and SLM (`python -m l2s_jax.demo` first):
            a T5 encoder-decoder and a ~20x smaller T5, synthetic task prompts;
  demo_hybrid  the demo's trained LLM verifying, and the demo's trained LLM-to-SLM
            (the SLM reading the LLM's frozen encoder through the projector) as
            the draft: a drafter trained with the LLM's prompt representation,
            which agrees with the LLM far more often than the SLM alone;
  wide      the demo pair with the LLM's feed-forward blocks widened (--wide_ff;
            new hidden units random, their output rows scaled by --wide_scale,
            default 0: the trained LLM's function exactly), while a decoding
            step now costs what reading ~150 MB of weights costs, the regime of real
            LLMs, where the loop's bookkeeping is small beside a step;
  wide_hybrid  that LLM, verifying drafts of the demo's trained LLM-to-SLM;
  wide_slm  the demo's SLM as the draft, and as the "LLM" the same SLM widened
            the same way (--wide_slm_ff, --wide_slm_scale): a ~200 MB model
            that agrees with its draft more often than the demo LLM does
            (alpha ~0.85-0.9), where the formula allows 2x with room to spare;
  trained_wide  an LLM trained from scratch at the wide size (configs/demo.py:llm_wide,
            39M params, train it first), the demo's SLM drafting;
  trained_wide_hybrid  that LLM, and an LLM-to-SLM trained on its frozen encoder
            (configs/demo.py:hybrid_wide) drafting: a pair trained for the bench;
  grown_hybrid  the demo's trained LLM grown to the wide size and trained on at it
            (bench/grow_llm.py, configs/demo.py:llm_grown), the demo's trained
            LLM-to-SLM drafting;
  deep      the demo's SLM as the draft,
            and as the "LLM" the same SLM with K extra decoder layers whose
            output projections are small random matrices (a deeper, slower
            model that agrees with the draft most of the time, not always).

For each pair, one prompt at a time (batch 1), greedy, stop at EOS: the LLM
alone, the SLM alone (for the cost ratio c = SLM time per token / LLM time
per token), and speculative decoding for each gamma, all measured side by
side after a warm-up (compile time apart). Each system also runs with one
new token only, which gives its fixed cost (prefill, dispatch); the rest is
its decoding phase. Beside each measured speedup: the one predicted from the
measured alpha, gamma and c (decoding phases) by Leviathan et al.'s formula
(1 - alpha^(g+1)) / ((1 - alpha)(g c + 1)), which models the decoding phase.
Outputs are checked to be identical to the LLM's.

  python bench/speculative.py --workdir /tmp/l2s_demo [--gammas 1,2,3,4,6,8]
      [--pairs demo,demo_hybrid,wide,wide_hybrid,trained_wide,trained_wide_hybrid,grown_hybrid,
       wide_slm,deep]
      [--json out.json]

A draft model that is an LLM-to-SLM hybrid also reads the prompt through its frozen
LLM encoder at prefill (passed as `slm_extra_inputs`, the same token ids: one tokenizer).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax.collab.speculative import expected_speedup, speculative_generate  # noqa: E402
from l2s_jax.decoding import generate, summarize  # noqa: E402
from l2s_jax.models import count_params  # noqa: E402
from l2s_jax.models.surgery import add_decoder_layers, widen_ffn  # noqa: E402

TARGET = 2.0


def demo_settings(pipeline):
  """(eos id, max new tokens, prompt buckets) the demo's task decodes with."""
  from l2s_jax import demo_lib

  cfg = demo_lib.system_config("llm")
  return pipeline.tokenizer.eos_id, cfg.decode.max_new_tokens, cfg.data.prompt_buckets


def demo_prompts(workdir: str, examples: int):
  """The first validation prompts of the demo's task, with its decoding settings."""
  pipeline, ids, mask, _ = common.demo_validation(workdir, examples)
  return (ids, mask, *demo_settings(pipeline))


def trained_wide_llm(workdir: str, which: str = "llm_wide"):
  """An LLM trained at the wide size: configs/demo.py:<which> in `workdir`/<which>."""
  from l2s_jax import demo_lib

  root = os.path.join(workdir, which)
  if not os.path.isdir(os.path.join(root, "checkpoints")):
    raise SystemExit(f"{root}: no trained model; train it first (configs/demo.py:{which})")
  ours, theirs = (
    open(os.path.join(d, "tokenizer", "tokenizer.json")).read()
    for d in (os.path.join(workdir, "llm"), root)
  )
  if ours != theirs:
    raise SystemExit(
      f"{root}: its tokenizer differs from {workdir}/llm's, whose prompts the bench uses"
    )
  return demo_lib.load_system(workdir, which)


def pass_costs(
  model, params, ids, mask, widths, reps: int = 64, repeats: int = 5, extra: dict | None = None
) -> dict[int, float]:
  """Seconds of one cached forward pass over T = 1 and over each T in `widths` tokens.

  Measured the way the decoding loops run them: passes in one compiled loop,
  each fed a token chosen from the previous pass's logits (a chain, as in
  decoding), the cache index reset after each pass so every pass sees the
  same prompt. Runs of `reps` and `2 reps` passes are timed and differenced,
  which removes the prefill and the dispatch. The verify pass of speculative
  decoding is T = gamma + 1. `extra`: more inputs of the prefill (a hybrid's).
  """
  extra = extra or {}
  lengths = [1] + sorted(set(widths) - {1})
  cache_len = model.cache_length(ids.shape[1], max(lengths))

  @functools.partial(jax.jit, static_argnames=("t", "n"))
  def loop(params, ids, mask, extra, *, t, n):
    first, cache = model.apply(
      {"params": params}, ids, mask, max_len=cache_len, method=model.prefill, **extra
    )
    start = cache["index"]

    def body(_, carry):
      token, cache = carry
      block = jnp.broadcast_to(token[:, None], (token.shape[0], t))
      logits, cache = model.apply({"params": params}, block, cache, method=model.extend)
      return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), {**cache, "index": start}

    token = jnp.argmax(first, -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, n, body, (token, cache))[0]

  out = {}
  for t in lengths:
    runs = {
      n: (lambda n=n: loop(params, ids, mask, extra, t=t, n=n).block_until_ready())
      for n in (reps, 2 * reps)
    }
    for fn in runs.values():
      fn()  # compile
    best = {n: min(common.timed(fn) for _ in range(repeats)) for n, fn in runs.items()}
    out[t] = max(best[2 * reps] - best[reps], 1e-9) / reps
  return out


def run_pair(
  name,
  llm,
  llm_params,
  slm,
  slm_params,
  prompts,
  gammas,
  eos,
  max_new,
  buckets,
  repeats,
  slm_reads_llm_encoder=False,
  reference=None,
):
  """Times LLM greedy, the draft model alone and speculative decoding at each gamma.

  slm_reads_llm_encoder: the draft is an LLM-to-SLM hybrid; its prefill also gets
  the prompt ids as the LLM encoder's input (shared tokenizer).
  reference: another model's greedy outputs, to check the LLM against (a widened
  LLM against the trained one it was grown from).
  """
  ids, mask = prompts
  n = ids.shape[0]

  def slm_extra(i, k):
    return {"llm_input_ids": i, "llm_attention_mask": k} if slm_reads_llm_encoder else {}

  def one_by_one(fn, new):
    return lambda: [fn(ids[r : r + 1], mask[r : r + 1], new) for r in range(n)]

  def plain(m, p, extra=lambda i, k: {}):
    return lambda i, k, new: np.asarray(
      generate(
        m, p, i, k, max_new_tokens=new, eos_id=eos, prompt_buckets=buckets, extra_inputs=extra(i, k)
      ).tokens
    )

  def spec(g):
    return lambda i, k, new: speculative_generate(
      llm,
      llm_params,
      slm,
      slm_params,
      i,
      k,
      max_new_tokens=new,
      gamma=g,
      eos_id=eos,
      prompt_buckets=buckets,
      slm_extra_inputs=slm_extra(i, k),
    )

  fns = {"llm": plain(llm, llm_params), "slm": plain(slm, slm_params, slm_extra)}
  fns.update({f"spec_g{g}": spec(g) for g in gammas})
  # Each system in full, and with one new token only: its fixed cost (prefill, dispatch),
  # so the decoding phase alone can be set against the formula, which models only that.
  systems = {}
  for k, fn in fns.items():
    systems[k] = one_by_one(fn, max_new)
    systems[k + "/1"] = one_by_one(fn, 1)
  compile_s, outputs = {}, {}
  for k, fn in systems.items():  # warm-up: compiles every bucket shape
    t0 = time.perf_counter()
    outputs[k] = fn()
    compile_s[k] = time.perf_counter() - t0
  seconds = common.alternate(systems, repeats)
  decode = {k: max(seconds[k] - seconds[k + "/1"], 1e-9) for k in fns}
  count = lambda outs: sum(int((t != 0).sum()) for t in outs)
  llm_tokens, slm_tokens = count(outputs["llm"]), count(outputs["slm"])
  # c: SLM decoding time per token / LLM decoding time per token (first tokens excluded).
  c = (decode["slm"] / max(slm_tokens - n, 1)) / (decode["llm"] / max(llm_tokens - n, 1))
  # Measured pass costs: the formula assumes a verify pass over g + 1 tokens costs one
  # LLM step and a draft step c of one; these say what they cost on this machine.
  llm_pass = pass_costs(llm, llm_params, ids[:1], mask[:1], [g + 1 for g in gammas])
  slm_pass = pass_costs(slm, slm_params, ids[:1], mask[:1], [2], extra=slm_extra(ids[:1], mask[:1]))
  rows = [
    {
      "pair": name,
      "system": "LLM greedy",
      "seconds": seconds["llm"],
      "decode_s": decode["llm"],
      "speedup": 1.0,
      "decode_speedup": 1.0,
    }
  ]
  for g in gammas:
    k = f"spec_g{g}"
    outs = outputs[k]
    same = all(np.array_equal(o.tokens, t) for o, t in zip(outs, outputs["llm"]))
    stats = summarize(outs[0].spec, outs)
    alpha = stats["acceptance_rate"]
    predicted = expected_speedup(alpha, g, c)
    # The same expected tokens per iteration over the iteration's measured cost in LLM
    # steps: a verify pass (v) and the drafts (the first reads two tokens).
    v = llm_pass[g + 1] / llm_pass[1]
    drafts = (slm_pass[2] + (g - 1) * slm_pass[1]) / llm_pass[1]
    predicted_costs = expected_speedup(alpha, g, 0.0) / (v + drafts)
    rows.append(
      {
        "pair": name,
        "system": f"speculative g={g}",
        "seconds": seconds[k],
        "decode_s": decode[k],
        "speedup": seconds["llm"] / seconds[k],
        "decode_speedup": decode["llm"] / decode[k],
        "alpha": alpha,
        "tokens_per_large_call": stats["tokens_per_large_call"],
        "c": c,
        "predicted": predicted,
        "decode/predicted": decode["llm"] / decode[k] / predicted,
        "verify_steps": v,
        "draft_steps": drafts,
        "predicted_costs": predicted_costs,
        "decode/predicted_costs": decode["llm"] / decode[k] / predicted_costs,
        "identical": same,
      }
    )
  same_as_reference = (
    None
    if reference is None
    else all(np.array_equal(a, b) for a, b in zip(outputs["llm"], reference))
  )
  return {
    "rows": rows,
    "compile_s": compile_s,
    "cost_ratio_c": c,
    "seconds": seconds,
    "llm_equals_reference": same_as_reference,
    "llm_params": count_params(llm_params),
    # A hybrid draft: its projector and SLM (the frozen LLM encoder runs at prefill only).
    "slm_params": count_params({k: v for k, v in slm_params.items() if k != "llm"}),
    "examples": n,
    "llm_tokens": llm_tokens,
    "llm_pass_s": llm_pass,
    "slm_pass_s": slm_pass,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="/tmp/l2s_demo")
  ap.add_argument("--gammas", default="1,2,3,4,6,8")
  ap.add_argument("--examples", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--deep_layers", type=int, default=23)
  ap.add_argument("--deep_scale", type=float, default=0.1)
  ap.add_argument("--wide_ff", type=int, default=16384)
  ap.add_argument("--wide_scale", type=float, default=0.0)
  ap.add_argument("--wide_slm_ff", type=int, default=262144)
  ap.add_argument("--wide_slm_scale", type=float, default=0.004)
  ap.add_argument(
    "--pairs",
    default="demo,demo_hybrid,wide,wide_hybrid",
    help="comma list of demo, demo_hybrid, wide, wide_hybrid, trained_wide, "
    "trained_wide_hybrid, grown_hybrid, wide_slm, deep",
  )
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  from l2s_jax.demo_lib import load_system

  gammas = [int(g) for g in args.gammas.split(",")]
  llm, llm_params = load_system(args.workdir, "llm")
  slm, slm_params = load_system(args.workdir, "slm")
  ids, mask, eos, max_new, buckets = demo_prompts(args.workdir, args.examples)
  print(json.dumps(common.machine()))
  results = {"machine": common.machine(), "args": vars(args), "pairs": {}}
  builders = {
    "demo": lambda: (llm, llm_params),
    "demo_hybrid": lambda: (llm, llm_params),
    "wide": lambda: widen_ffn(llm, llm_params, args.wide_ff, out_scale=args.wide_scale),
    "wide_hybrid": lambda: widen_ffn(llm, llm_params, args.wide_ff, out_scale=args.wide_scale),
    "wide_slm": lambda: widen_ffn(slm, slm_params, args.wide_slm_ff, out_scale=args.wide_slm_scale),
    "trained_wide": lambda: trained_wide_llm(args.workdir),
    "trained_wide_hybrid": lambda: trained_wide_llm(args.workdir),
    "grown_hybrid": lambda: trained_wide_llm(args.workdir, "llm_grown"),
    "deep": lambda: add_decoder_layers(
      slm, slm_params, args.deep_layers, out_scale=args.deep_scale
    ),
  }
  names = args.pairs.split(",")
  if unknown := sorted(set(names) - set(builders)):
    raise SystemExit(f"unknown --pairs {unknown}; choose from {sorted(builders)}")
  # Each pair's draft: the demo SLM, or a trained LLM-to-SLM (its own frozen LLM encoder).
  hybrids = {
    "demo_hybrid": "hybrid",
    "wide_hybrid": "hybrid",
    "grown_hybrid": "hybrid",
    "trained_wide_hybrid": "hybrid_wide",
  }
  drafts = {k: load_system(args.workdir, w) for k, w in hybrids.items() if k in names}
  # The trained LLM's own greedy outputs: a widened LLM is checked against them.
  trained = [
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
    for r in range(ids.shape[0])
  ]
  for name in names:
    m, p = builders[name]()
    drafter, dp = drafts.get(name, (slm, slm_params))
    r = run_pair(
      name,
      m,
      p,
      drafter,
      dp,
      (ids, mask),
      gammas,
      eos,
      max_new,
      buckets,
      args.repeats,
      slm_reads_llm_encoder=name in drafts,
      reference=trained if name in ("wide", "wide_hybrid") else None,
    )
    results["pairs"][name] = r
    jax.clear_caches()  # each pair compiles dozens of loops; LLVM runs out of mappings
    print(
      f"\n{name}: LLM {r['llm_params']:,} params, draft {r['slm_params']:,}, "
      f"c = {r['cost_ratio_c']:.3f}, {r['examples']} prompts one at a time, "
      f"{r['llm_tokens']} LLM tokens"
      + (
        ""
        if r["llm_equals_reference"] is None
        else f"; LLM output = the trained demo LLM's: {r['llm_equals_reference']}"
      )
    )
    print(
      common.table(
        r["rows"],
        [
          "system",
          "seconds",
          "speedup",
          "decode_s",
          "decode_speedup",
          "alpha",
          "tokens_per_large_call",
          "predicted",
          "decode/predicted",
          "verify_steps",
          "draft_steps",
          "predicted_costs",
          "decode/predicted_costs",
          "identical",
        ],
      )
    )
    best = max(x["speedup"] for x in r["rows"])
    best_dec = max(x["decode_speedup"] for x in r["rows"])
    best_pred = max(x.get("predicted", 1.0) for x in r["rows"])
    print(
      f"best end-to-end speedup {best:.2f}x, decoding phase {best_dec:.2f}x "
      f"(target >= {TARGET}x); the formula with the measured alpha and c predicts at most "
      f"{best_pred:.2f}x"
    )
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
