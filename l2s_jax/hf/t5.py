"""T5 / T5 v1.1 / Flan-T5 / mT5 checkpoints <-> `l2s_jax.models.t5`."""

from __future__ import annotations

import numpy as np

from l2s_jax.hf import convert
from l2s_jax.hf.io import CheckpointError
from l2s_jax.models.t5 import T5, T5Config

MODEL_TYPES = ("t5", "mt5")
# The tensors `config_from_hf` reads (the rest of the checkpoint is not needed for it).
CONFIG_TENSORS = ("shared.weight", "encoder.embed_tokens.weight", "lm_head.weight")

# Copies of `shared` kept by some checkpoints, and a bias transformers never uses.
IGNORE = (
  r"(encoder|decoder)\.embed_tokens\.weight",
  r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)


def is_encoder_only(hf_config: dict, tensors: dict) -> bool:
  archs = hf_config.get("architectures") or []
  return bool({"T5EncoderModel", "MT5EncoderModel"} & set(archs)) or not any(
    k.startswith("decoder.") for k in tensors
  )


def config_from_hf(hf: dict, tensors: dict, dtype) -> T5Config:
  try:
    num_layers = int(hf["num_layers"])
    shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    head = tensors.get("lm_head.weight")
    # transformers >= 5 ties the head unless the checkpoint holds a different one
    # (T5Config and MT5Config both force tie_word_embeddings=True).
    untied = head is not None and (
      shared is None or head.shape != shared.shape or not np.array_equal(head, shared)
    )
    model_type = hf["model_type"]
    if model_type == "mt5":
      scale = False  # MT5ForConditionalGeneration never rescales the decoder output
    elif "scale_decoder_outputs" in hf:
      scale = bool(hf["scale_decoder_outputs"])
    else:  # T5Config: the saved tie_word_embeddings says whether to scale
      scale = hf.get("tie_word_embeddings", True) is not False
    return T5Config(
      vocab_size=int(hf["vocab_size"]),
      d_model=int(hf["d_model"]),
      d_kv=int(hf["d_kv"]),
      d_ff=int(hf["d_ff"]),
      num_layers=num_layers,
      num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
      num_heads=int(hf["num_heads"]),
      relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
      feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
      tie_word_embeddings=not untied,
      scale_decoder_outputs=scale,
      pad_token_id=int(hf.get("pad_token_id") or 0),
      eos_token_id=_first(hf.get("eos_token_id", 1)),
      decoder_start_token_id=int(hf.get("decoder_start_token_id") or hf.get("pad_token_id") or 0),
      model_type=model_type,
      dtype=dtype,
      param_dtype=dtype,
    )
  except KeyError as e:
    raise CheckpointError(f"T5 config.json lacks the field {e.args[0]!r}") from e


def _first(x):
  return int(x[0] if isinstance(x, (list, tuple)) else x)


def _check_representable(c: T5Config) -> None:
  if c.model_type not in MODEL_TYPES:
    raise ValueError(f"T5 model_type {c.model_type!r}; use one of {list(MODEL_TYPES)}")
  if c.model_type == "mt5" and c.scale_decoder_outputs:
    raise ValueError(
      "transformers' MT5 never scales the decoder output: save a model with "
      "scale_decoder_outputs=True as model_type 't5'"
    )


def config_to_hf(c: T5Config, encoder_only: bool) -> dict:
  _check_representable(c)
  act = c.feed_forward_proj.split("-")[-1]
  prefix = "MT5" if c.model_type == "mt5" else "T5"
  return {
    "model_type": c.model_type,
    "architectures": [
      f"{prefix}EncoderModel" if encoder_only else f"{prefix}ForConditionalGeneration"
    ],
    "vocab_size": c.vocab_size,
    "d_model": c.d_model,
    "d_kv": c.d_kv,
    "d_ff": c.d_ff,
    "num_layers": c.num_layers,
    "num_decoder_layers": c.num_decoder_layers,
    "num_heads": c.num_heads,
    "relative_attention_num_buckets": c.relative_attention_num_buckets,
    "relative_attention_max_distance": c.relative_attention_max_distance,
    "layer_norm_epsilon": c.layer_norm_epsilon,
    "feed_forward_proj": c.feed_forward_proj,
    "dense_act_fn": c.activation if c.is_gated else act,
    "is_gated_act": c.is_gated,
    "tie_word_embeddings": c.tie_word_embeddings,
    "scale_decoder_outputs": c.scale_decoder_outputs,
    "pad_token_id": c.pad_token_id,
    "eos_token_id": c.eos_token_id,
    "decoder_start_token_id": c.decoder_start_token_id,
    "is_encoder_decoder": True,
    "dropout_rate": 0.0,
  }


def _attention(rules, hf_prefix, path, c: T5Config):
  d, n, h = c.d_model, c.num_heads, c.d_kv
  for name in ("q", "k", "v"):
    rules.append(convert.linear(f"{hf_prefix}.{name}.weight", path + (name,), n * h, d, (d, n, h)))
  rules.append(convert.linear(f"{hf_prefix}.o.weight", path + ("o",), d, n * h, (n, h, d)))


def rules(c: T5Config, encoder_only: bool) -> list[convert.Rule]:
  d, f = c.d_model, c.d_ff
  out = [convert.copy("shared.weight", ("shared", "embedding"), (c.vocab_size, d))]
  stacks = [("encoder", c.num_layers)]
  if not encoder_only:
    stacks.append(("decoder", c.num_decoder_layers))
  for stack, n_layers in stacks:
    out.append(
      convert.copy(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (stack, "relative_attention_bias"),
        (c.relative_attention_num_buckets, c.num_heads),
      )
    )
    for i in range(n_layers):
      hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      _attention(out, f"{hf}.0.SelfAttention", ours + ("self_attention",), c)
      out.append(
        convert.copy(f"{hf}.0.layer_norm.weight", ours + ("self_attention_norm", "scale"), (d,))
      )
      ff = 1
      if stack == "decoder":
        _attention(out, f"{hf}.1.EncDecAttention", ours + ("cross_attention",), c)
        out.append(
          convert.copy(f"{hf}.1.layer_norm.weight", ours + ("cross_attention_norm", "scale"), (d,))
        )
        ff = 2
      wis = ("wi_0", "wi_1") if c.is_gated else ("wi",)
      for wi in wis:
        out.append(
          convert.linear(f"{hf}.{ff}.DenseReluDense.{wi}.weight", ours + ("mlp", wi), f, d, (d, f))
        )
      out.append(
        convert.linear(f"{hf}.{ff}.DenseReluDense.wo.weight", ours + ("mlp", "wo"), d, f, (f, d))
      )
      out.append(convert.copy(f"{hf}.{ff}.layer_norm.weight", ours + ("mlp_norm", "scale"), (d,)))
    out.append(
      convert.copy(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), (d,))
    )
  if not encoder_only and not c.tie_word_embeddings:
    out.append(convert.linear("lm_head.weight", ("lm_head",), c.vocab_size, d, (d, c.vocab_size)))
  return out


def ignore(c: T5Config) -> tuple[str, ...]:
  # A tied head may still be stored (equal to `shared`).
  return IGNORE + ((r"lm_head\.weight",) if c.tie_word_embeddings else ())


def prepare_tensors(tensors: dict) -> dict:
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors = {**tensors, "shared.weight": tensors["encoder.embed_tokens.weight"]}
  return tensors


def build(c: T5Config, encoder_only: bool) -> T5:
  return T5(c, encoder_only=encoder_only)
