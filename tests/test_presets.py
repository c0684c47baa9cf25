"""Full-size presets: parameter counts via jax.eval_shape vs transformers on `meta`."""

import dataclasses

import jax
import pytest
import torch
import transformers as tf

from l2s_jax.models import GPT2, Llama, T5, count_params, gpt2, init_params, llama, t5


def _ours(model) -> int:
  return count_params(jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0))))


def _torch_count(model) -> int:
  return sum(p.numel() for p in model.parameters())  # shared tensors counted once


@pytest.mark.parametrize("name", sorted(t5.PRESETS))
def test_t5_presets(name):
  c = t5.PRESETS[name]
  mt5 = c.model_type == "mt5"
  cfg_cls, cls, enc_cls = (
    (tf.MT5Config, tf.MT5ForConditionalGeneration, tf.MT5EncoderModel)
    if mt5
    else (tf.T5Config, tf.T5ForConditionalGeneration, tf.T5EncoderModel)
  )
  assert name.startswith("mt5") == mt5
  hf_cfg = cfg_cls(
    vocab_size=c.vocab_size,
    d_model=c.d_model,
    d_kv=c.d_kv,
    d_ff=c.d_ff,
    num_layers=c.num_layers,
    num_decoder_layers=c.num_decoder_layers,
    num_heads=c.num_heads,
    feed_forward_proj=c.feed_forward_proj,
  )
  with torch.device("meta"):
    ref = cls(hf_cfg)
    if not c.tie_word_embeddings:
      # v1.1 / Flan / mT5 checkpoints carry their own head, which transformers
      # >= 5 keeps untied when loading them.
      ref.lm_head.weight = torch.nn.Parameter(torch.empty(c.vocab_size, c.d_model))
    expected = _torch_count(ref)
    encoder_expected = _torch_count(enc_cls(hf_cfg))
  assert _ours(T5(c)) == expected
  assert _ours(T5(c, encoder_only=True)) == encoder_expected


@pytest.mark.parametrize("name", sorted(gpt2.PRESETS))
def test_gpt2_presets(name):
  c = gpt2.PRESETS[name]
  hf_cfg = tf.GPT2Config(
    vocab_size=c.vocab_size,
    n_positions=c.n_positions,
    n_embd=c.n_embd,
    n_layer=c.n_layer,
    n_head=c.n_head,
  )
  with torch.device("meta"):
    expected = _torch_count(tf.GPT2LMHeadModel(hf_cfg))
  assert _ours(GPT2(c)) == expected


@pytest.mark.parametrize("name", sorted(llama.PRESETS))
def test_llama_qwen_presets(name):
  c = llama.PRESETS[name]
  kw = dict(
    vocab_size=c.vocab_size,
    hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size,
    num_hidden_layers=c.num_hidden_layers,
    num_attention_heads=c.num_attention_heads,
    num_key_value_heads=c.num_key_value_heads,
    tie_word_embeddings=c.tie_word_embeddings,
  )
  cls, cfg_cls = (
    (tf.Qwen2ForCausalLM, tf.Qwen2Config)
    if c.model_type == "qwen2"
    else (tf.LlamaForCausalLM, tf.LlamaConfig)
  )
  with torch.device("meta"):
    expected = _torch_count(cls(cfg_cls(**kw)))
  assert _ours(Llama(c)) == expected


def test_known_sizes():
  """Published sizes, as a check on the preset numbers themselves."""
  assert _ours(T5(t5.PRESETS["t5-small"])) == 60_506_624
  assert _ours(GPT2(gpt2.PRESETS["gpt2"])) == 124_439_808
  assert _ours(Llama(llama.PRESETS["qwen2-0.5b"])) == 494_032_768


# Sizes as the model cards and papers quote them (mT5: Xue et al. 2021, Table 1), and the
# significant digits they give.
PUBLISHED = {
  "mt5-small": (300e6, 3),
  "mt5-base": (580e6, 2),
  "mt5-large": (1.2e9, 2),
  "mt5-xl": (3.7e9, 2),
  "mt5-xxl": (13e9, 2),
  "flan-t5-small": (77e6, 2),
  "flan-t5-base": (248e6, 3),
  "flan-t5-large": (783e6, 3),
  "flan-t5-xl": (2.85e9, 3),
  # Quoted as 11.3B in places; the architecture (d_model 4096, d_ff 10240, 64 heads,
  # 24 + 24 layers, untied head) gives 11,135,332,352, the count transformers gives too.
  "flan-t5-xxl": (11.1e9, 3),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_t5_family_sizes(name):
  count, digits = PUBLISHED[name]
  ours = _ours(T5(t5.PRESETS[name]))
  assert float(f"{ours:.{digits}g}") == count, f"{name}: {ours:,}"


def test_presets_are_frozen_data():
  with pytest.raises(dataclasses.FrozenInstanceError):
    t5.PRESETS["t5-small"].d_model = 1
