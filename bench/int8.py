"""int8 weight-only decoding (qwix, `decode.weights='int8'`) against the stored weights.

Quality, on the demo's trained models (`--workdir`, `python -m l2s_jax.demo` first; the grown
39M LLM too when WORKDIR/llm_grown exists): greedy tokens with int8 weights vs the stored
float32 weights on the first validation prompts (agreement as in bench/bf16_agreement.py)
and BLEU of each.

Speed, random weights of T5-small and GPT-2 shape (prompt 64, exactly 64 new tokens, batch 1
and 32) and the grown LLM at batch 1: ms per new token ((time for 64 - time for 1) / 63) with
float32 weights, int8 weights computed in float32, and bfloat16 weights, alternating after a
warm-up; and the bytes of weights each reads.

  python bench/int8.py [--workdir /tmp/l2s_demo] [--examples 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import os

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax import assemble, build, quantize  # noqa: E402
from l2s_jax.decoding import generate  # noqa: E402

PROMPT, NEW = 64, 64
TARGET_AGREEMENT = 0.99


def quality(workdir: str, examples: int) -> list[dict]:
  from l2s_jax import demo_lib

  pipeline, ids, mask, refs = common.demo_validation(workdir, examples)
  eos = pipeline.tokenizer.eos_id
  systems = list(demo_lib.SYSTEMS)
  if os.path.isdir(os.path.join(workdir, "llm_grown", "checkpoints")):
    systems.append("llm_grown")
  rows = []
  for which in systems:
    c = demo_lib.system_config(which, workdir)
    model, params = demo_lib.load_system(workdir, which)
    outs = {
      w: common.demo_greedy(c, model, quantize.quantize_weights(params, w), ids, mask, eos)
      for w in ("stored", "int8")
    }
    agree, total = common.token_agreement(outs["stored"], outs["int8"])
    bleu = {w: common.bleu(pipeline, o, refs) for w, o in outs.items()}
    rows.append(
      {
        "system": which,
        "token_agreement": agree / total,
        "target_met": agree / total >= TARGET_AGREEMENT,
        "bleu_float32": bleu["stored"],
        "bleu_int8": bleu["int8"],
        "tokens": total,
      }
    )
    jax.clear_caches()
  return rows


def speed(name: str, model, params, batch: int, repeats: int) -> dict:
  rng = np.random.RandomState(batch)
  vocab = min(1000, model.config.vocab_size)
  ids = rng.randint(5, vocab, (batch, PROMPT)).astype(np.int32)
  mask = np.ones_like(ids)
  variants = {
    "float32": params,
    "int8": quantize.quantize_weights(params, "int8"),
    "bfloat16": jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params),
  }
  models = {
    "float32": model,
    "int8": model,
    "bfloat16": build.with_compute_dtype(model, "bfloat16"),
  }
  fns = {}
  for v, p in variants.items():
    m = models[v]
    for n in (NEW, 1):
      fns[f"{v}/{n}"] = lambda m=m, p=p, n=n: np.asarray(
        generate(m, p, ids, mask, max_new_tokens=n, eos_id=None, prompt_buckets=None).tokens
      )
  outs = {k: fn() for k, fn in fns.items()}  # compile
  t = common.alternate(fns, repeats)
  row = {"model": name, "batch": batch}
  for v, p in variants.items():
    row[f"{v}_ms_per_token"] = 1e3 * (t[f"{v}/{NEW}"] - t[f"{v}/1"]) / (NEW - 1)
    row[f"{v}_weights_MB"] = quantize.nbytes(p) / 1e6
  row["int8_vs_float32"] = row["float32_ms_per_token"] / row["int8_ms_per_token"]
  row["bfloat16_vs_float32"] = row["float32_ms_per_token"] / row["bfloat16_ms_per_token"]
  row["int8_token_agreement"] = float((outs[f"int8/{NEW}"] == outs[f"float32/{NEW}"]).mean())
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/l2s_demo")
  p.add_argument("--examples", type=int, default=300)
  p.add_argument("--models", default="t5-small,gpt2")
  p.add_argument("--batches", default="1,32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  print(common.machine())
  q = quality(args.workdir, args.examples) if args.examples else []
  if q:
    print(common.table(q, list(q[0])), flush=True)
  rows = []
  for name in [m for m in args.models.split(",") if m]:
    run = assemble.initial(common.preset_config(name))
    for b in [int(x) for x in args.batches.split(",")]:
      rows.append(speed(name, run.compute_model, run.params, b, args.repeats))
      print(common.table(rows[-1:], list(rows[-1])), flush=True)
    jax.clear_caches()
  if os.path.isdir(os.path.join(args.workdir, "llm_grown", "checkpoints")):
    from l2s_jax import demo_lib

    model, params = demo_lib.load_system(args.workdir, "llm_grown")
    rows.append(speed("llm_grown (39M, trained)", model, params, 1, args.repeats))
  cols = [
    "model",
    "batch",
    "float32_ms_per_token",
    "int8_ms_per_token",
    "bfloat16_ms_per_token",
    "int8_vs_float32",
    "bfloat16_vs_float32",
    "float32_weights_MB",
    "int8_weights_MB",
    "int8_token_agreement",
  ]
  print(common.table(rows, cols))
  common.write_json(args.json, {"machine": common.machine(), "quality": q, "speed": rows})


if __name__ == "__main__":
  main()
