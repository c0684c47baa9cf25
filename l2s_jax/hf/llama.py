"""Llama / Qwen2 checkpoints <-> `l2s_jax.models.llama`."""

from __future__ import annotations

from l2s_jax.hf import convert
from l2s_jax.hf.io import CheckpointError
from l2s_jax.models.llama import Llama, LlamaConfig

MODEL_TYPES = ("llama", "qwen2")
# The tensors `config_from_hf` reads (the rest of the checkpoint is not needed for it).
CONFIG_TENSORS = ()

IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def is_encoder_only(hf_config: dict, tensors: dict) -> bool:
  return False


def _rope_theta(hf: dict) -> float:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", None):
    raise CheckpointError(f"rope_type {rope_type!r} is not supported (only 'default' rotary)")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, tensors: dict, dtype) -> LlamaConfig:
  model_type = hf["model_type"]
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise CheckpointError("Qwen2 with use_sliding_window=true is not supported")
  try:
    heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=str(hf.get("hidden_act", "silu")),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
        model_type=model_type, dtype=dtype, param_dtype=dtype)
  except KeyError as e:
    raise CheckpointError(f"{model_type} config.json lacks the field {e.args[0]!r}") from e


def _first(x):
  if x is None:
    return None
  return int(x[0] if isinstance(x, (list, tuple)) else x)


def config_to_hf(c: LlamaConfig, encoder_only: bool = False) -> dict:
  hf = {
      "model_type": c.model_type,
      "architectures": ["Qwen2ForCausalLM" if c.model_type == "qwen2" else "LlamaForCausalLM"],
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
      "num_attention_heads": c.num_attention_heads,
      "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_width,
      "rms_norm_eps": c.rms_norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
      "rope_theta": c.rope_theta,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": c.hidden_act,
      "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
  }
  if c.model_type == "llama":
    hf["attention_bias"] = c.qkv_bias
    hf["mlp_bias"] = c.mlp_bias
  return hf


def _check_representable(c: LlamaConfig) -> None:
  """Bias combinations that the target transformers class cannot express."""
  if c.model_type == "qwen2" and (not c.qkv_bias or c.o_bias or c.mlp_bias):
    raise ValueError("a qwen2 model has q/k/v biases and no o/mlp biases")
  if c.model_type == "llama" and c.qkv_bias != c.o_bias:
    raise ValueError("a llama model has either all attention biases or none")


def rules(c: LlamaConfig, encoder_only: bool = False) -> list[convert.Rule]:
  d, n, k, h, f = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                   c.head_width, c.intermediate_size)
  r = [convert.copy("model.embed_tokens.weight", ("embedder", "embedding"), (c.vocab_size, d))]
  for i in range(c.num_hidden_layers):
    hf, ours = f"model.layers.{i}", (f"blocks_{i}",)
    att = ours + ("attn",)
    r.append(convert.copy(f"{hf}.input_layernorm.weight", ours + ("attn_norm", "scale"), (d,)))
    for name, heads in (("q", n), ("k", k), ("v", k)):
      r.append(convert.linear(f"{hf}.self_attn.{name}_proj.weight", att + (name,), heads * h, d, (d, heads, h)))
      if c.qkv_bias:
        r.append(convert.reshape(f"{hf}.self_attn.{name}_proj.bias", att + (f"{name}_bias",),
                                 (heads * h,), (heads, h)))
    r.append(convert.linear(f"{hf}.self_attn.o_proj.weight", att + ("o",), d, n * h, (n, h, d)))
    if c.o_bias:
      r.append(convert.copy(f"{hf}.self_attn.o_proj.bias", att + ("o_bias",), (d,)))
    r.append(convert.copy(f"{hf}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,)))
    for name, (fo, fi) in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      r.append(convert.linear(f"{hf}.mlp.{name}_proj.weight", ours + ("mlp", name), fo, fi, (fi, fo)))
      if c.mlp_bias:
        r.append(convert.copy(f"{hf}.mlp.{name}_proj.bias", ours + ("mlp", f"{name}_bias"), (fo,)))
  r.append(convert.copy("model.norm.weight", ("final_norm", "scale"), (d,)))
  if not c.tie_word_embeddings:
    r.append(convert.linear("lm_head.weight", ("lm_head",), c.vocab_size, d, (d, c.vocab_size)))
  return r


def ignore(c: LlamaConfig) -> tuple[str, ...]:
  return IGNORE + ((r"lm_head\.weight",) if c.tie_word_embeddings else ())


def prepare_tensors(tensors: dict) -> dict:
  return tensors


def build(c: LlamaConfig, encoder_only: bool = False) -> Llama:
  return Llama(c)
