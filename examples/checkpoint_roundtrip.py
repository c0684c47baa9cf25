"""A first look without downloads: build a random T5-small, save it as a
transformers checkpoint, load it back, and run the encoder-decoder once.

  python examples/checkpoint_roundtrip.py --workdir /tmp/l2s_example
"""

import argparse
import os

import jax
import numpy as np

from l2s_jax import hf
from l2s_jax.models import T5, count_params, init_params, t5


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/l2s_example")
  parser.add_argument("--preset", default="t5-small", choices=sorted(t5.PRESETS))
  args = parser.parse_args()

  model = T5(t5.PRESETS[args.preset])
  params = init_params(model, jax.random.PRNGKey(0))
  path = os.path.join(args.workdir, args.preset)
  hf.save(model, params, path)
  loaded, loaded_params = hf.load(path)
  ids = np.arange(2, 18, dtype=np.int32).reshape(2, 8)
  forward = jax.jit(
    lambda p, x: loaded.apply({"params": p}, x, jax.numpy.ones_like(x), decoder_input_ids=x[:, :4])
  )
  logits = forward(loaded_params, ids)
  same = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_params))
  )
  print(f"{args.preset}: {count_params(loaded_params):,} parameters written to {path}")
  print(
    f"reloaded params identical: {same}; logits {tuple(logits.shape)}, "
    f"first row argmax {np.asarray(logits[0].argmax(-1)).tolist()}"
  )


if __name__ == "__main__":
  main()
