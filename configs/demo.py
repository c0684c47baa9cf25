"""The default offline experiment on the synthetic task (see l2s_jax/demo.py).

  python train.py --config configs/demo.py:llm --workdir DIR/llm
  python train.py --config configs/demo.py:hybrid --workdir DIR/hybrid --config.llm.path=DIR/llm/export
  python train.py --config configs/demo.py:slm --workdir DIR/slm

"llm":    a T5 encoder-decoder of a few million parameters, trained on the task;
"hybrid": its frozen encoder + projector + an SLM about 10x smaller (LLM-to-SLM);
"slm":    the same SLM alone, with the same training budget (the baseline).
"""

import json

from l2s_jax.config_schema import base_config

LLM = dict(d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=6, num_heads=4)
SLM = dict(d_model=48, d_kv=12, d_ff=192, num_layers=1, num_decoder_layers=1, num_heads=4)


def get_config(which: str = "hybrid"):
  if which not in ("llm", "hybrid", "slm"):
    raise ValueError(f"configs/demo.py:{which}: use llm, hybrid or slm")
  c = base_config()
  c.data.synthetic.num_train = 100000
  c.data.synthetic.nouns = 100
  c.data.synthetic.adjectives = 25
  c.data.synthetic.verbs = 40
  c.data.synthetic.max_adjectives = 2
  c.data.synthetic.num_validation = 300
  c.data.synthetic.num_test = 300
  c.data.prompt_buckets = (16, 32)
  c.data.target_buckets = (16, 32, 48)
  c.data.max_prompt_len = 32
  c.data.max_target_len = 48
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.checkpoint_every = 500
  c.mesh.data = -1                 # all devices (1 on a plain CPU, 8 simulated in the tests)
  c.opt.warmup_steps = 50
  c.opt.clip_norm = 1.0
  c.decode.max_new_tokens = 48
  c.decode.batch_size = 50
  c.decode.batch1_examples = 30
  c.model.kind = "plain" if which != "hybrid" else "hybrid"
  model = LLM if which == "llm" else SLM
  c.slm.preset = "t5-small"                 # T5 shapes: ReLU FFN, tied embeddings
  c.slm.overrides = json.dumps(model)
  if which == "llm":
    c.train.steps = 1800
    c.opt.learning_rate = 1e-3
    c.opt.warmup_steps = 100
  else:
    c.train.steps = 1200
    c.opt.learning_rate = 3e-3
  if which == "hybrid":
    c.llm.preset = "t5-small"               # the LLM's shapes; the demo sets llm.path to
    c.llm.overrides = json.dumps(LLM)       # the trained LLM (without it: a random encoder)
  return c
