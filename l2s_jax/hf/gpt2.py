"""GPT-2 checkpoints <-> `l2s_jax.models.gpt2`."""

from __future__ import annotations

from l2s_jax.hf import convert
from l2s_jax.hf.io import CheckpointError
from l2s_jax.models.gpt2 import GPT2, GPT2Config

MODEL_TYPES = ("gpt2",)
# The tensors `config_from_hf` reads (the rest of the checkpoint is not needed for it).
CONFIG_TENSORS = ()

# Causal-mask buffers stored by old checkpoints; a tied head.
IGNORE = (r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight")


def is_encoder_only(hf_config: dict, tensors: dict) -> bool:
  return False


def config_from_hf(hf: dict, tensors: dict, dtype) -> GPT2Config:
  if hf.get("add_cross_attention"):
    raise CheckpointError("GPT-2 with cross-attention (add_cross_attention=true) is not supported")
  try:
    return GPT2Config(
      vocab_size=int(hf["vocab_size"]),
      n_positions=int(hf["n_positions"]),
      n_embd=int(hf["n_embd"]),
      n_layer=int(hf["n_layer"]),
      n_head=int(hf["n_head"]),
      n_inner=None if hf.get("n_inner") is None else int(hf["n_inner"]),
      activation_function=str(hf.get("activation_function", "gelu_new")),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
      scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
      bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 50256),
      eos_token_id=int(hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 50256),
      dtype=dtype,
      param_dtype=dtype,
    )
  except KeyError as e:
    raise CheckpointError(f"GPT-2 config.json lacks the field {e.args[0]!r}") from e


def config_to_hf(c: GPT2Config, encoder_only: bool) -> dict:
  return {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": c.vocab_size,
    "n_positions": c.n_positions,
    "n_embd": c.n_embd,
    "n_layer": c.n_layer,
    "n_head": c.n_head,
    "n_inner": c.n_inner,
    "activation_function": c.activation_function,
    "layer_norm_epsilon": c.layer_norm_epsilon,
    "scale_attn_weights": c.scale_attn_weights,
    "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
    "bos_token_id": c.bos_token_id,
    "eos_token_id": c.eos_token_id,
    "tie_word_embeddings": True,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
  }


def rules(c: GPT2Config, encoder_only: bool = False) -> list[convert.Rule]:
  d, n, h, f = c.n_embd, c.n_head, c.head_dim, c.inner
  r = [
    convert.copy("wte.weight", ("wte", "embedding"), (c.vocab_size, d)),
    convert.copy("wpe.weight", ("wpe",), (c.n_positions, d)),
  ]
  for i in range(c.n_layer):
    hf, ours = f"h.{i}", (f"blocks_{i}",)
    for ln in ("ln_1", "ln_2"):
      r.append(convert.copy(f"{hf}.{ln}.weight", ours + (ln, "scale"), (d,)))
      r.append(convert.copy(f"{hf}.{ln}.bias", ours + (ln, "bias"), (d,)))
    r += [
      convert.reshape(f"{hf}.attn.c_attn.weight", ours + ("attn", "qkv"), (d, 3 * d), (d, 3, n, h)),
      convert.reshape(f"{hf}.attn.c_attn.bias", ours + ("attn", "qkv_bias"), (3 * d,), (3, n, h)),
      convert.reshape(f"{hf}.attn.c_proj.weight", ours + ("attn", "o"), (d, d), (n, h, d)),
      convert.copy(f"{hf}.attn.c_proj.bias", ours + ("attn", "o_bias"), (d,)),
      convert.copy(f"{hf}.mlp.c_fc.weight", ours + ("mlp", "fc"), (d, f)),
      convert.copy(f"{hf}.mlp.c_fc.bias", ours + ("mlp", "fc_bias"), (f,)),
      convert.copy(f"{hf}.mlp.c_proj.weight", ours + ("mlp", "proj"), (f, d)),
      convert.copy(f"{hf}.mlp.c_proj.bias", ours + ("mlp", "proj_bias"), (d,)),
    ]
  r += [
    convert.copy("ln_f.weight", ("ln_f", "scale"), (d,)),
    convert.copy("ln_f.bias", ("ln_f", "bias"), (d,)),
  ]
  return r


def ignore(c: GPT2Config) -> tuple[str, ...]:
  return IGNORE


def prepare_tensors(tensors: dict) -> dict:
  """GPT2LMHeadModel stores `transformer.`-prefixed keys, GPT2Model none."""
  return {
    k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in tensors.items()
  }


def hf_prefix() -> str:
  return "transformer."


def build(c: GPT2Config, encoder_only: bool = False) -> GPT2:
  return GPT2(c)
