"""A tiny LLM-to-SLM run on the synthetic task (tests, smoke runs): random small T5s."""

from l2s_jax.config_schema import base_config


def get_config():
  c = base_config()
  c.model.kind = "hybrid"
  c.llm.preset = "t5-v1_1-small"
  c.llm.overrides = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4
  )
  c.slm.preset = "t5-small"
  c.slm.overrides = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4
  )
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_validation = 64
  c.data.synthetic.num_test = 64
  c.data.prompt_buckets = (32,)
  c.data.target_buckets = (32,)
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  c.mesh.data = -1  # all devices (8 simulated ones in the tests)
  c.decode.max_new_tokens = 32
  c.decode.batch_size = 16
  return c
