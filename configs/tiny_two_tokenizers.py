"""The paper's decoder-only setting at test size: T5 LLM (SentencePiece Unigram tokenizer) ->
projector -> GPT-2 SLM (byte-level BPE), or a Llama / Qwen2 SLM on the same BPE.

Both tokenizers are trained on the synthetic task's train split at first use and kept in the
workdir (`tokenizer/`, `llm_tokenizer/`); every SLM prompt token receives the mean of the LLM
states whose character spans overlap it. No download:

  python train.py --config configs/tiny_two_tokenizers.py:gpt2 --workdir /tmp/two_tok
  python eval.py  --config configs/tiny_two_tokenizers.py:gpt2 --workdir /tmp/two_tok

`:llm` is the T5 alone on the Unigram tokenizer (a plain model), to train the LLM first and
hand it to the hybrid with its tokenizer, as the paper does with a pretrained T5:

  python train.py  --config configs/tiny_two_tokenizers.py:llm --workdir /tmp/t5
  python export.py --config configs/tiny_two_tokenizers.py:llm --workdir /tmp/t5 \
      --kind transformers --out /tmp/t5_hf
  python train.py  --config configs/tiny_two_tokenizers.py:gpt2 --workdir /tmp/two_tok \
      --config.llm.path=/tmp/t5_hf/model --config.data.llm_tokenizer=/tmp/t5_hf/model
"""

from l2s_jax.config_schema import base_config

SLMS = {
  "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=160)),
  "llama": (
    "tinyllama-1.1b",
    dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
    ),
  ),
  "qwen2": (
    "qwen2.5-0.5b",
    dict(
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=128,
      tie_word_embeddings=True,
    ),
  ),
}


def get_config(slm: str = "gpt2"):
  if slm not in SLMS and slm != "llm":
    raise ValueError(f"configs/tiny_two_tokenizers.py:{slm}: use one of {sorted(SLMS) + ['llm']}")
  c = base_config()
  c.model.kind = "hybrid"
  c.llm.preset = "t5-v1_1-small"
  c.llm.overrides = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4
  )
  if slm == "llm":  # the T5 alone, on its own tokenizer
    c.model.kind = "plain"
    c.slm.preset, c.slm.overrides = c.llm.preset, c.llm.overrides
    c.data.tokenizer, c.data.llm_tokenizer = "unigram:300", ""
  else:
    c.slm.preset, overrides = SLMS[slm]
    c.slm.overrides = overrides
    c.data.tokenizer = "byte_bpe:400"
    c.data.llm_tokenizer = "unigram:300"
  c.data.tokenizer_corpus = 2000
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_validation = 32
  c.data.synthetic.num_test = 32
  c.data.max_prompt_len = 64
  c.data.max_target_len = 64
  c.data.prompt_buckets = (32, 64)
  c.data.target_buckets = (32, 64)
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.checkpoint_every = 20
  c.opt.learning_rate = 3e-3
  c.mesh.data = -1  # all devices
  c.decode.max_new_tokens = 64
  c.decode.batch_size = 16
  return c
