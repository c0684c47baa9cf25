"""Small random transformers (PyTorch) models saved to disk: the references."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
  """Non-trivial norms and biases (a fresh model has them at 1 and 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def t5(kind: str = "t5", seed: int = 0, **overrides):
  """kind: "t5" (ReLU, tied, scaled head), "t5v1_1" (gated-GELU, untied head: the Flan-T5
  architecture), "mt5" (transformers' MT5 as 5.x builds it: gated-GELU, tied head, never
  scaled) or "mt5-untied" (its own head, as the published mT5 checkpoints have)."""
  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=97,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
  )
  if kind == "t5v1_1":
    cfg.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  cfg.update(overrides)
  if kind.startswith("mt5"):
    model = tf.MT5ForConditionalGeneration(tf.MT5Config(**cfg)).eval()
  else:
    model = tf.T5ForConditionalGeneration(tf.T5Config(**cfg)).eval()
  if kind in ("t5v1_1", "mt5-untied"):
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg["vocab_size"], cfg["d_model"]))
  _perturb(model, seed)
  return model


def gpt2(seed: int = 0, **overrides) -> tf.GPT2LMHeadModel:
  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=97,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_inner=48,
    initializer_range=0.2,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=1,
    eos_token_id=1,
  )
  cfg.update(overrides)
  model = tf.GPT2LMHeadModel(tf.GPT2Config(**cfg)).eval()
  _perturb(model, seed)
  return model


def qwen2(seed: int = 0, **overrides) -> tf.Qwen2ForCausalLM:
  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_theta=500.0,
    tie_word_embeddings=False,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=1,
  )
  cfg.update(overrides)
  model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**cfg)).eval()
  _perturb(model, seed)
  return model


def llama(seed: int = 0, **overrides) -> tf.LlamaForCausalLM:
  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=64,
    attention_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=1,
  )
  cfg.update(overrides)
  model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
  _perturb(model, seed)
  return model


def torch_logits(model, **inputs) -> np.ndarray:
  with torch.no_grad():
    return (
      model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}).logits.float().numpy()
    )


def padded_batch(seed: int, batch: int, length: int, vocab: int, *, left_pad=(), right_pad=()):
  """Random ids (never 0/1, the pad and eos ids) with some rows padded.

  left_pad / right_pad: (row, n_pad) pairs.
  """
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, vocab, (batch, length)).astype(np.int32)
  mask = np.ones_like(ids)
  for row, n in left_pad:
    mask[row, :n] = 0
    ids[row, :n] = 0
  for row, n in right_pad:
    mask[row, length - n :] = 0
    ids[row, length - n :] = 0
  return ids, mask


def jitted(model, method: str | None = None, **static):
  """jit(model.apply) as f(params, *args): eager applies compile op by op (slow)."""
  import jax

  fn = None if method is None else getattr(model, method)
  return jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=fn, **static))


# Rope scaling variants: factors that change the frequencies, lengths the tests exceed.
ROPE = {
  "linear": dict(rope_type="linear", factor=2.0),
  "dynamic": dict(rope_type="dynamic", factor=3.0),
  "llama3": dict(
    rope_type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
  ),
  "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
}


def rope_model(family: str, rope_type: str, seed: int = 0):
  """A Llama or Qwen2 with head_dim 16 and `ROPE[rope_type]`; max_position_embeddings 32 (the
  length past which dynamic NTK rescales), 64 for the others (llama3 and yarn rescale past
  original_max_position_embeddings = 16)."""
  make = {"llama": llama, "qwen2": qwen2}[family]
  return make(
    seed=seed,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32 if rope_type == "dynamic" else 64,
    rope_parameters=dict(rope_theta=500.0, **ROPE[rope_type]),
  )


def torch_greedy(model, ids, mask, n: int, eos: int = 1, encoder_decoder: bool = False):
  """transformers' greedy generate, [B, n] new tokens, 0 after a row's eos."""
  with torch.no_grad():
    out = model.generate(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=n,
      min_new_tokens=0,
      eos_token_id=eos,
      pad_token_id=0,
    ).numpy()
  gen = out[:, 1:] if encoder_decoder else out[:, ids.shape[1] :]
  padded = np.zeros((ids.shape[0], n), np.int64)
  padded[:, : gen.shape[1]] = gen
  return padded


def eos_that_ends_some_rows(model, ids, mask, encoder_decoder: bool, n: int = 14) -> int:
  """An id the model's greedy output (n new tokens) holds mid-sequence in some rows and not at
  all in others: as the EOS id it ends some rows early, not all (so EOS really matters)."""
  free = torch_greedy(model, ids, mask, n, eos=None, encoder_decoder=encoder_decoder)
  for t in range(1, n - 1):
    for row in range(ids.shape[0]):
      tok = int(free[row, t])
      first = [np.flatnonzero(r == tok)[0] if (r == tok).any() else n for r in free]
      if max(first) == n and any(0 < f < n - 1 for f in first):
        return tok  # some row stops mid-way, some row never stops
  raise AssertionError("no suitable eos id")


def softmax_sampling_distribution(logits_V, temperature: float, top_k: int | None = None):
  """The distribution a sampler at `temperature` (then top-k: 0 / None is all) draws from,
  by hand from one row of logits: [V] float64."""
  z = np.asarray(logits_V, np.float64) / temperature
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  e = np.exp(z - z.max())
  return e / e.sum()


def exact_two_token_distribution(model, prompt, temperature, top_k=None):
  """P(x1, x2 | prompt) of a decoder-only model's own sampling, from full forwards: [V, V]."""

  def dist(seq):
    z = torch_logits(model, input_ids=np.asarray([seq]))[0, -1]
    return softmax_sampling_distribution(z, temperature, top_k)

  p1 = dist(prompt)
  return np.stack([p1[a] * dist(prompt + [a]) for a in range(len(p1))])
