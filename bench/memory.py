"""Decoding memory: KV-cache bytes and the process's peak memory, ours vs transformers.

GPT-2 and T5-small shapes (random weights), batch 32, prompt 512, exactly 512 new tokens
(`--batch`, `--prompt`, `--new`), greedy, in each dtype. Each (system, model, dtype) runs in
its own subprocess, so every peak (`ru_maxrss`, the most resident memory the process ever
held) is its own; the same process's peak after loading the weights and one tiny warm-up
generation is reported beside it, and the difference is what decoding added. KV-cache bytes:
ours from the cache the decoder allocates (`model.init_cache` shapes, its whole length), theirs
from the `past_key_values` transformers returns (self-attention keys and values; T5's
cross-attention cache too, as ours holds it).

  python bench/memory.py [--json out.json] [--models gpt2,t5-small] [--dtypes float32,bfloat16]
      [--systems l2s_jax,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _hf_model(name: str):
  import torch
  import transformers as tf

  torch.manual_seed(0)
  if name == "t5-small":
    tm = tf.T5ForConditionalGeneration(tf.T5Config(dropout_rate=0.0, decoder_start_token_id=0))
  else:
    tm = tf.GPT2LMHeadModel(tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  tm.eval()
  tm.generation_config.eos_token_id = None
  tm.generation_config.pad_token_id = 0
  return tm


def _cache_bytes(tree) -> int:
  import torch

  total = 0
  stack = [tree]
  while stack:
    x = stack.pop()
    if isinstance(x, torch.Tensor):
      total += x.numel() * x.element_size()
    elif isinstance(x, (list, tuple)):
      stack.extend(x)
    elif hasattr(x, "layers"):  # transformers' Cache objects
      stack.extend(x.layers)
    elif hasattr(x, "self_attention_cache"):  # EncoderDecoderCache
      stack.extend([x.self_attention_cache, x.cross_attention_cache])
    else:
      stack.extend(v for k, v in vars(x).items() if k in ("keys", "values"))
  return total


def one(system: str, name: str, dtype: str, batch: int, prompt: int, new: int) -> dict:
  """Runs in a subprocess: the numbers of one system."""
  import numpy as np

  rng = np.random.RandomState(0)
  ids = rng.randint(5, 1000, (batch, prompt)).astype(np.int64)
  mask = np.ones_like(ids)
  tm = _hf_model(name)
  if system == "transformers":
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tm = tm.to(getattr(torch, dtype))
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
      tm.generate(
        input_ids=ids_t[:1, :8], attention_mask=mask_t[:1, :8], max_new_tokens=2, do_sample=False
      )
      loaded = peak_mib()
      out = tm.generate(
        input_ids=ids_t,
        attention_mask=mask_t,
        do_sample=False,
        max_new_tokens=new,
        return_dict_in_generate=True,
      )
    cache = _cache_bytes(out.past_key_values)
  else:
    import jax

    import common
    from l2s_jax import assemble
    from l2s_jax.decoding import generate
    from l2s_jax.decoding.request import cache_length

    with tempfile.TemporaryDirectory() as tmp:
      tm.save_pretrained(tmp)
      del tm
      c = common.preset_config("", slm_path=tmp)
      c.slm.dtype = c.train.compute_dtype = dtype
      run = assemble.initial(c)
    model, params = run.compute_model, run.params
    generate(
      model, params, ids[:1, :8], mask[:1, :8], max_new_tokens=2, eos_id=None, prompt_buckets=None
    )
    loaded = peak_mib()
    out = generate(model, params, ids, mask, max_new_tokens=new, eos_id=None, prompt_buckets=None)
    jax.block_until_ready(out.tokens)
    length = cache_length(model, prompt, new)
    shapes = jax.eval_shape(lambda: model.init_cache(batch, length, dtype=model.config.dtype))
    cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    if name == "t5-small":  # plus the cross-attention keys/values of the prompt
      cache += _t5_cross_bytes(model, batch, prompt)
  return {
    "system": system,
    "model": name,
    "dtype": dtype,
    "batch": batch,
    "prompt": prompt,
    "new": new,
    "kv_cache_MiB": cache / 2**20,
    "peak_after_load_MiB": loaded,
    "peak_MiB": peak_mib(),
    "decoding_added_MiB": peak_mib() - loaded,
  }


def _t5_cross_bytes(model, batch: int, prompt: int) -> int:
  import numpy as np

  c = model.config
  return (
    2 * c.num_decoder_layers * batch * c.num_heads * c.d_kv * prompt * np.dtype(c.dtype).itemsize
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="gpt2,t5-small")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--prompt", type=int, default=512)
  ap.add_argument("--new", type=int, default=512)
  ap.add_argument("--systems", default="l2s_jax,transformers")
  ap.add_argument("--json", default="")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:
    print(json.dumps(one(**json.loads(args.one))))
    return
  import common

  rows = []
  for name in args.models.split(","):
    for dtype in args.dtypes.split(","):
      for system in args.systems.split(","):
        spec = dict(
          system=system, name=name, dtype=dtype, batch=args.batch, prompt=args.prompt, new=args.new
        )
        res = subprocess.run(
          [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)],
          capture_output=True,
          text=True,
        )
        if res.returncode:
          raise SystemExit(f"{spec}: failed\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(common.table(rows[-1:], list(rows[-1])), flush=True)
  print(
    common.table(
      rows,
      [
        "system",
        "model",
        "dtype",
        "kv_cache_MiB",
        "peak_after_load_MiB",
        "peak_MiB",
        "decoding_added_MiB",
      ],
    )
  )
  print(common.machine())
  common.write_json(args.json, {"benchmark": "memory", "machine": common.machine(), "rows": rows})


if __name__ == "__main__":
  main()
