"""Llama / Qwen2 checkpoints <-> `l2s_jax.models.llama`."""

from __future__ import annotations

from l2s_jax.hf import convert
from l2s_jax.hf.io import CheckpointError
from l2s_jax.models import rope
from l2s_jax.models.llama import Llama, LlamaConfig
from l2s_jax.models.rope import RopeScaling

MODEL_TYPES = ("llama", "qwen2")
# The tensors `config_from_hf` reads (the rest of the checkpoint is not needed for it).
CONFIG_TENSORS = ()

IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def is_encoder_only(hf_config: dict, tensors: dict) -> bool:
  return False


_ROPE_FIELDS = {  # per rope type: the rope_parameters keys RopeScaling takes
  "default": (),
  "linear": ("factor",),
  "dynamic": ("factor",),
  "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
  "yarn": (
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
  ),
}


def _rope(hf: dict) -> tuple[float, RopeScaling]:
  """(rope_theta, scaling) read the way transformers 5.x reads them: `rope_scaling`
  (older config.json files) wins over `rope_parameters`; the theta comes from that dict,
  else the top-level `rope_theta`; a top-level `original_max_position_embeddings` wins
  over the dict's (transformers' rule for Phi-3-style configs), else it defaults to
  `max_position_embeddings`."""
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
    raise CheckpointError(f"rope parameters per layer type are not supported: {params!r}")
  rope_type = params.get("rope_type", params.get("type")) or "default"
  if rope_type not in _ROPE_FIELDS:
    raise CheckpointError(
      f"rope_type {rope_type!r} is not supported; supported rope types: {list(rope.SUPPORTED)}"
    )
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise CheckpointError(
      f"partial_rotary_factor={partial} is not supported (rotary on the whole head only)"
    )
  theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
  fields = {k: params[k] for k in _ROPE_FIELDS[rope_type] if params.get(k) is not None}
  if rope_type in ("llama3", "yarn"):
    fields["original_max_position_embeddings"] = int(
      hf.get("original_max_position_embeddings")
      or fields.get("original_max_position_embeddings")
      or hf.get("max_position_embeddings", 2048)
    )
  if rope_type == "yarn" and "factor" not in fields:  # transformers: the ratio of the lengths
    fields["factor"] = hf["max_position_embeddings"] / fields["original_max_position_embeddings"]
  missing = [
    k
    for k in ("factor", "low_freq_factor", "high_freq_factor")
    if k in _ROPE_FIELDS[rope_type] and k not in fields
  ]
  if missing:
    raise CheckpointError(f"rope_type {rope_type!r} needs {missing} in its rope parameters")
  return theta, RopeScaling(rope_type=rope_type, **fields)


def _sliding_layers(hf: dict) -> list[int]:
  """Qwen2 layers that really use sliding-window attention (transformers' rule: none unless
  use_sliding_window; then `layer_types`, or the layers from max_window_layers on)."""
  if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
    return []
  n = int(hf["num_hidden_layers"])
  types = hf.get("layer_types") or [
    "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
    for i in range(n)
  ]
  return [i for i, t in enumerate(types) if t == "sliding_attention"]


def config_from_hf(hf: dict, tensors: dict, dtype) -> LlamaConfig:
  model_type = hf["model_type"]
  try:
    sliding = _sliding_layers(hf) if model_type == "qwen2" else []
    if sliding:
      raise CheckpointError(
        f"Qwen2 sliding-window attention is not supported: use_sliding_window=true with "
        f"sliding_window={hf['sliding_window']} on layer(s) {sliding}"
      )
    theta, scaling = _rope(hf)
    heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    return LlamaConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_hidden_layers=int(hf["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=None if hf.get("head_dim") is None else int(hf["head_dim"]),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      qkv_bias=model_type == "qwen2" or attention_bias,
      o_bias=model_type == "llama" and attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      hidden_act=str(hf.get("hidden_act", "silu")),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=_first(hf.get("eos_token_id")),
      model_type=model_type,
      dtype=dtype,
      param_dtype=dtype,
    )
  except KeyError as e:
    raise CheckpointError(f"{model_type} config.json lacks the field {e.args[0]!r}") from e


def _rope_to_hf(c: LlamaConfig) -> dict:
  s = c.rope_scaling
  out = {"rope_type": s.rope_type, "rope_theta": c.rope_theta}
  for k in _ROPE_FIELDS[s.rope_type]:
    v = getattr(s, k)
    if v is not None:
      out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
  if "original_max_position_embeddings" in out:
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
  return out


def _first(x):
  if x is None:
    return None
  return int(x[0] if isinstance(x, (list, tuple)) else x)


def config_to_hf(c: LlamaConfig, encoder_only: bool = False) -> dict:
  hf = {
    "model_type": c.model_type,
    "architectures": ["Qwen2ForCausalLM" if c.model_type == "qwen2" else "LlamaForCausalLM"],
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size,
    "num_hidden_layers": c.num_hidden_layers,
    "num_attention_heads": c.num_attention_heads,
    "num_key_value_heads": c.num_key_value_heads,
    "head_dim": c.head_width,
    "rms_norm_eps": c.rms_norm_eps,
    "rope_parameters": _rope_to_hf(c),
    "rope_theta": c.rope_theta,
    "max_position_embeddings": c.max_position_embeddings,
    "tie_word_embeddings": c.tie_word_embeddings,
    "hidden_act": c.hidden_act,
    "bos_token_id": c.bos_token_id,
    "eos_token_id": c.eos_token_id,
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
  d, n, k, h, f = (
    c.hidden_size,
    c.num_attention_heads,
    c.num_key_value_heads,
    c.head_width,
    c.intermediate_size,
  )
  r = [convert.copy("model.embed_tokens.weight", ("embedder", "embedding"), (c.vocab_size, d))]
  for i in range(c.num_hidden_layers):
    hf, ours = f"model.layers.{i}", (f"blocks_{i}",)
    att = ours + ("attn",)
    r.append(convert.copy(f"{hf}.input_layernorm.weight", ours + ("attn_norm", "scale"), (d,)))
    for name, heads in (("q", n), ("k", k), ("v", k)):
      r.append(
        convert.linear(
          f"{hf}.self_attn.{name}_proj.weight", att + (name,), heads * h, d, (d, heads, h)
        )
      )
      if c.qkv_bias:
        r.append(
          convert.reshape(
            f"{hf}.self_attn.{name}_proj.bias", att + (f"{name}_bias",), (heads * h,), (heads, h)
          )
        )
    r.append(convert.linear(f"{hf}.self_attn.o_proj.weight", att + ("o",), d, n * h, (n, h, d)))
    if c.o_bias:
      r.append(convert.copy(f"{hf}.self_attn.o_proj.bias", att + ("o_bias",), (d,)))
    r.append(
      convert.copy(f"{hf}.post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,))
    )
    for name, (fo, fi) in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
      r.append(
        convert.linear(f"{hf}.mlp.{name}_proj.weight", ours + ("mlp", name), fo, fi, (fi, fo))
      )
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
