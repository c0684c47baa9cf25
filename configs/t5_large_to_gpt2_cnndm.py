"""LLM-to-SLM on CNN/DailyMail: frozen T5-large encoder -> projector -> GPT-2 (decoder-only SLM).

The two tokenizers differ, so each GPT-2 prompt token receives the mean of the T5 encoder
states whose character spans overlap it (see l2s_jax/data/batching.py). Needs local copies:

  python train.py --config configs/t5_large_to_gpt2_cnndm.py --workdir /runs/cnndm \
      --config.llm.path=/ckpt/t5-large --config.slm.path=/ckpt/gpt2 \
      --config.data.tokenizer=/ckpt/gpt2 --config.data.llm_tokenizer=/ckpt/t5-large \
      --config.data.tfds_data_dir=/data/tfds
  python eval.py ... (same flags) --config.decode.split=test

(`tfds build cnn_dailymail --data_dir /data/tfds` prepares the data once.)
"""

from l2s_jax.config_schema import base_config


def get_config():
  c = base_config()
  c.model.kind = "hybrid"
  c.model.mode = "add"
  c.llm.preset = "t5-large"
  c.slm.preset = "gpt2"
  c.data.source = "tfds"
  c.data.tfds_task = "cnn_dailymail"
  c.data.tokenizer = ""  # required: the GPT-2 tokenizer directory
  c.data.llm_tokenizer = ""  # required: the T5 tokenizer directory
  c.data.max_prompt_len = 512
  c.data.max_target_len = 128
  c.data.prompt_buckets = (256, 512)
  c.data.target_buckets = (64, 128)
  # Batches built in 2 worker processes (enough for a v5e/v6e/v5p-8 step at batch 256,
  # docs/benchmarks.md); capped, with a warning, on a machine with fewer cores.
  c.data.workers = 2
  c.opt.learning_rate = 1e-3
  c.opt.schedule = "cosine"
  c.opt.warmup_fraction = 0.03
  c.train.steps = 9_000  # ~1 epoch of 287k articles at batch 32
  c.train.batch_size = 32
  c.train.compute_dtype = "bfloat16"
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.decode.max_new_tokens = 128
  c.decode.batch_size = 32
  return c
