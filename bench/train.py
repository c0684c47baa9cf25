"""Training throughput: the LLM-to-SLM train step vs full fine-tuning of the LLM.

LLM: T5-large shape; SLM: T5-small shape; random weights; the same batch of
(prompt, target) pairs; AdamW on both. LLM-to-SLM differentiates only the
projector and the SLM (the frozen encoder runs forward only); full
fine-tuning differentiates the whole encoder-decoder. The two steps run
alternately after a compile/warm-up step.

  python bench/train.py [--json out.json] [--batch 8] [--repeats 3] [--compute_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from l2s_jax import assemble  # noqa: E402
from l2s_jax.config_schema import base_config  # noqa: E402
from l2s_jax.models import count_params  # noqa: E402
from l2s_jax.optimizer import make_optimizer  # noqa: E402
from l2s_jax.train_step import TrainState, train_step  # noqa: E402

TARGET = 3.0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json", default=None)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--target", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--llm", default="t5-large")
  parser.add_argument("--slm", default="t5-small")
  parser.add_argument(
    "--compute_dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="train.compute_dtype: params stay float32 (the frozen LLM too)",
  )
  args = parser.parse_args()

  # Both through the assembly layer. The hybrid has its own frozen encoder: the full
  # fine-tuning step donates (and so deletes) the LLM's arrays.
  configs = [common.preset_config(args.llm), common.preset_config(args.slm, llm=args.llm)]
  for c in configs:
    c.train.compute_dtype = args.compute_dtype
  full_run, l2s_run = (assemble.initial(c) for c in configs)
  llm, llm_params = full_run.compute_model, full_run.trainable
  hybrid, frozen, trainable = l2s_run.compute_model, l2s_run.frozen, l2s_run.trainable

  rng = np.random.RandomState(0)
  b = args.batch
  batch = {
    "inputs": rng.randint(5, 32000, (b, args.prompt)).astype(np.int32),
    "inputs_mask": np.ones((b, args.prompt), np.int32),
    "targets": rng.randint(5, 32000, (b, args.target)).astype(np.int32),
    "targets_mask": np.ones((b, args.target), np.int32),
  }
  opt = base_config().opt
  tx, schedule = make_optimizer(opt, 1000)

  def state_for(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  step = lambda model: jax.jit(
    functools.partial(
      train_step, model=model, tx=tx, grad_accum=1, label_smoothing=0.0, schedule=schedule
    ),
    donate_argnums=(0,),
  )
  l2s_step, full_step = step(hybrid), step(llm)
  states = {"l2s": state_for(trainable), "full": state_for(llm_params)}
  del llm_params, full_run

  def run_l2s():
    states["l2s"], m = l2s_step(states["l2s"], frozen, batch)
    return float(m["loss"])

  def run_full():
    states["full"], m = full_step(states["full"], {}, batch)
    return float(m["loss"])

  compile_s = {"l2s": common.timed(run_l2s), "full": common.timed(run_full)}
  t = common.alternate({"l2s": run_l2s, "full": run_full}, args.repeats)
  tokens = b * (args.prompt + args.target)
  row = {
    "batch": b,
    "tokens_per_step": tokens,
    "l2s_step_s": t["l2s"],
    "full_step_s": t["full"],
    "l2s_tokens_per_s": tokens / t["l2s"],
    "full_tokens_per_s": tokens / t["full"],
    "speedup": t["full"] / t["l2s"],
    "target": TARGET,
    "met": t["full"] / t["l2s"] >= TARGET,
    "trainable_params_l2s": count_params(states["l2s"].params),
    "trainable_params_full": count_params(states["full"].params),
    "first_step_l2s_s": compile_s["l2s"],
    "first_step_full_s": compile_s["full"],
  }
  print(
    f"LLM-to-SLM ({args.llm} encoder frozen + {args.slm}) vs full fine-tuning of "
    f"{args.llm}, batch {b} x ({args.prompt} + {args.target}) tokens, computed in "
    f"{args.compute_dtype}"
  )
  print(common.table([row], list(row)))
  common.write_json(
    args.json,
    {
      "benchmark": "train",
      "machine": common.machine(),
      "llm": args.llm,
      "slm": args.slm,
      "compute_dtype": args.compute_dtype,
      "rows": [row],
    },
  )


if __name__ == "__main__":
  main()
