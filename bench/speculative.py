"""Speculative greedy decoding vs the LLM's own greedy decoding, on CPU.

Pairs:
  demo      the demo's trained LLM and SLM (`python -m l2s_jax.demo` first):
            a T5 encoder-decoder and a ~20x smaller T5, synthetic task prompts;
  deep      a pair where the cost ratio allows 2x: the demo's SLM as the draft,
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

  python bench/speculative.py --workdir /tmp/l2s_demo [--gammas 1,2,3,4,6,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax import hf  # noqa: E402
from l2s_jax.collab.speculative import expected_speedup, speculative_generate  # noqa: E402
from l2s_jax.decoding import generate  # noqa: E402
from l2s_jax.models import T5, count_params  # noqa: E402

TARGET = 2.0


def demo_prompts(workdir: str, examples: int):
  from l2s_jax.collab.analyze import _prompts
  from l2s_jax.data import build_pipeline
  from l2s_jax.demo import demo_config
  cfg = demo_config("llm")
  pipeline = build_pipeline(cfg.data, model_kind="encoder_decoder", hybrid=False, batch_size=1,
                            workdir=os.path.join(workdir, "llm"))
  ids, mask, _ = _prompts(pipeline, examples)
  return ids, mask, pipeline.tokenizer.eos_id, cfg.decode.max_new_tokens, cfg.data.prompt_buckets


def deepen(model, params, extra: int, scale: float, seed: int = 0):
  """`model` with `extra` more decoder layers (copies of its last one) whose output
  projections are scale * random: the same function plus a small perturbation."""
  import dataclasses
  cfg = dataclasses.replace(model.config, num_decoder_layers=model.config.num_decoder_layers + extra)
  deep = T5(cfg)
  dec = dict(params["decoder"])
  n = model.config.num_decoder_layers
  last = dec[f"layers_{n - 1}"] if f"layers_{n - 1}" in dec else None
  if last is None:
    raise KeyError(f"unexpected decoder param names: {sorted(dec)[:5]}")
  key = jax.random.PRNGKey(seed)
  for i in range(extra):
    def perturb(path, x):
      nonlocal key
      if str(getattr(path[-1], "key", path[-1])) in ("o", "wo"):   # attention / FFN outputs
        key, sub = jax.random.split(key)
        return scale * x.std() * jax.random.normal(sub, x.shape, x.dtype)
      return x
    dec[f"layers_{n + i}"] = jax.tree_util.tree_map_with_path(perturb, last)
  return deep, {**params, "decoder": dec}


def run_pair(name, llm, llm_params, slm, slm_params, prompts, gammas, eos, max_new, buckets,
             repeats):
  ids, mask = prompts
  n = ids.shape[0]

  def one_by_one(fn, new):
    return lambda: [fn(ids[r:r + 1], mask[r:r + 1], new) for r in range(n)]

  def plain(m, p):
    return lambda i, k, new: np.asarray(generate(
        m, p, i, k, max_new_tokens=new, eos_id=eos, prompt_buckets=buckets).tokens)

  def spec(g):
    return lambda i, k, new: speculative_generate(
        llm, llm_params, slm, slm_params, i, k, max_new_tokens=new, gamma=g, eos_id=eos,
        prompt_buckets=buckets)

  fns = {"llm": plain(llm, llm_params), "slm": plain(slm, slm_params)}
  fns.update({f"spec_g{g}": spec(g) for g in gammas})
  # Each system in full, and with one new token only: its fixed cost (prefill, dispatch),
  # so the decoding phase alone can be set against the formula, which models only that.
  systems = {}
  for k, fn in fns.items():
    systems[k] = one_by_one(fn, max_new)
    systems[k + "/1"] = one_by_one(fn, 1)
  compile_s, outputs = {}, {}
  for k, fn in systems.items():                   # warm-up: compiles every bucket shape
    t0 = time.perf_counter()
    outputs[k] = fn()
    compile_s[k] = time.perf_counter() - t0
  seconds = common.alternate(systems, repeats)
  decode = {k: max(seconds[k] - seconds[k + "/1"], 1e-9) for k in fns}
  count = lambda outs: sum(int((t != 0).sum()) for t in outs)
  llm_tokens, slm_tokens = count(outputs["llm"]), count(outputs["slm"])
  # c: SLM decoding time per token / LLM decoding time per token (first tokens excluded).
  c = (decode["slm"] / max(slm_tokens - n, 1)) / (decode["llm"] / max(llm_tokens - n, 1))
  rows = [{"pair": name, "system": "LLM greedy", "seconds": seconds["llm"],
           "decode_s": decode["llm"], "speedup": 1.0, "decode_speedup": 1.0}]
  for g in gammas:
    k = f"spec_g{g}"
    outs = outputs[k]
    same = all(np.array_equal(o.tokens, t) for o, t in zip(outs, outputs["llm"]))
    accepted = sum(int(o.accepted.sum()) for o in outs)
    rejected = sum(int(o.rejected.sum()) for o in outs)
    calls = sum(int(o.llm_calls.sum()) for o in outs)
    gen = sum(int(o.lengths.sum()) for o in outs)
    alpha = accepted / max(accepted + rejected, 1)
    predicted = expected_speedup(alpha, g, c)
    rows.append({"pair": name, "system": f"speculative g={g}", "seconds": seconds[k],
                 "decode_s": decode[k], "speedup": seconds["llm"] / seconds[k],
                 "decode_speedup": decode["llm"] / decode[k], "alpha": alpha,
                 "tokens_per_llm_call": gen / max(calls, 1), "c": c, "predicted": predicted,
                 "decode/predicted": decode["llm"] / decode[k] / predicted, "identical": same})
  return {"rows": rows, "compile_s": compile_s, "cost_ratio_c": c, "seconds": seconds,
          "llm_params": count_params(llm_params), "slm_params": count_params(slm_params),
          "examples": n, "llm_tokens": llm_tokens}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="/tmp/l2s_demo")
  ap.add_argument("--gammas", default="1,2,3,4,6,8")
  ap.add_argument("--examples", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--deep_layers", type=int, default=23)
  ap.add_argument("--deep_scale", type=float, default=0.1)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  from l2s_jax.demo import demo_config, export_plain
  gammas = [int(g) for g in args.gammas.split(",")]
  llm, llm_params = hf.load(os.path.join(args.workdir, "llm", "transformers"))
  slm, slm_params = hf.load(export_plain(demo_config("slm"), os.path.join(args.workdir, "slm")))
  ids, mask, eos, max_new, buckets = demo_prompts(args.workdir, args.examples)
  print(json.dumps(common.machine()))
  results = {"machine": common.machine(), "args": vars(args), "pairs": {}}
  deep, deep_params = deepen(slm, slm_params, args.deep_layers, args.deep_scale)
  for name, (m, p) in {"demo": (llm, llm_params), "deep": (deep, deep_params)}.items():
    r = run_pair(name, m, p, slm, slm_params, (ids, mask), gammas, eos, max_new, buckets,
                 args.repeats)
    results["pairs"][name] = r
    print(f"\n{name}: LLM {r['llm_params']:,} params, SLM {r['slm_params']:,}, "
          f"c = {r['cost_ratio_c']:.3f}, {r['examples']} prompts one at a time, "
          f"{r['llm_tokens']} LLM tokens")
    print(common.table(r["rows"], ["system", "seconds", "speedup", "decode_s", "decode_speedup",
                                   "alpha", "tokens_per_llm_call", "predicted",
                                   "decode/predicted", "identical"]))
    best = max(x["speedup"] for x in r["rows"])
    best_dec = max(x["decode_speedup"] for x in r["rows"])
    best_pred = max(x.get("predicted", 1.0) for x in r["rows"])
    print(f"best end-to-end speedup {best:.2f}x, decoding phase {best_dec:.2f}x "
          f"(target >= {TARGET}x); the formula with the measured alpha and c predicts at most "
          f"{best_pred:.2f}x")
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
