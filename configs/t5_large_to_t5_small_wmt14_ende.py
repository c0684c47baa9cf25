"""LLM-to-SLM on WMT14 En-De: frozen T5-large encoder -> projector -> T5-small (the paper's setting).

Needs local copies (no download at run time):
  LLM   a transformers directory of t5-large (or flan-t5-large), e.g. /ckpt/t5-large
  SLM   a transformers directory of t5-small (the SLM starts from it), e.g. /ckpt/t5-small
  data  wmt14_translate/de-en prepared once: tfds build wmt14_translate/de-en --data_dir /data/tfds

  python train.py --config configs/t5_large_to_t5_small_wmt14_ende.py --workdir /runs/ende \
      --config.llm.path=/ckpt/t5-large --config.slm.path=/ckpt/t5-small \
      --config.data.tokenizer=/ckpt/t5-small --config.data.tfds_data_dir=/data/tfds
  python eval.py --config configs/t5_large_to_t5_small_wmt14_ende.py --workdir /runs/ende \
      --config.llm.path=/ckpt/t5-large --config.slm.path=/ckpt/t5-small \
      --config.data.tokenizer=/ckpt/t5-small --config.data.tfds_data_dir=/data/tfds \
      --config.decode.split=test --config.decode.method=beam --config.decode.num_beams=4

Training recipe of the public reimplementation of LLM-to-SLM (Bergner et al., 2024; see
README.md): AdamW, lr 1e-3, cosine, 3% warmup, no weight decay, effective batch 32, bf16 compute. The paper trains on LLM-generated targets
(distillation); point data.source=jsonl at such a file to reproduce that.
"""

from l2s_jax.config_schema import base_config


def get_config(mesh: str = "data"):
  c = base_config()
  c.model.kind = "hybrid"
  c.model.mode = "add"
  c.llm.preset = "t5-large"  # shapes; the weights come from --config.llm.path
  c.slm.preset = "t5-small"
  c.data.source = "tfds"
  c.data.tfds_task = "wmt14_ende"
  c.data.tokenizer = ""  # required: the T5 tokenizer directory (shared by both)
  c.data.max_prompt_len = 128
  c.data.max_target_len = 128
  c.data.prompt_buckets = (32, 64, 128)
  c.data.target_buckets = (32, 64, 128)
  # Batches built in 2 worker processes (enough for a v5e/v6e/v5p-8 step at batch 256,
  # docs/benchmarks.md); capped, with a warning, on a machine with fewer cores.
  c.data.workers = 2
  c.opt.learning_rate = 1e-3
  c.opt.schedule = "cosine"
  c.opt.warmup_fraction = 0.03
  c.opt.weight_decay = 0.0
  c.train.steps = 140_000  # ~1 epoch of 4.5M pairs at batch 32
  c.train.batch_size = 32
  c.train.compute_dtype = "bfloat16"
  c.train.eval_every = 5000
  c.train.checkpoint_every = 5000
  c.decode.max_new_tokens = 128
  c.decode.batch_size = 64
  if mesh == "fsdp":  # a pod slice: shard the frozen encoder over fsdp x tensor
    c.mesh.fsdp = 4
    c.llm.rules = "fsdp_tensor"
  return c
