"""The one declaration of every config field, with its default.

Config files in `configs/` start from `base_config()` and change values; a
field that is not declared here is an error (a typo must not be silently
ignored), and so is a value of the wrong type.
"""

from __future__ import annotations

import json
import re
import sys
import warnings

import ml_collections

from l2s_jax import metrics
from l2s_jax.config_decode import validate_decode
from l2s_jax.data import get_default_data_config

# Fields whose value is a structure rather than one value: a model group's `overrides` (a
# dict of preset fields) and `opt.lr_multipliers` ((regex, factor) pairs). `structured` is the
# one place their values are read into that form (an old JSON string included).
STRUCTURED_FIELDS = ("overrides", "lr_multipliers")


# The decoding settings' checks and specs live in config_decode; the router enums in
# collab.combine (the engine they describe).


def _model_group(**overrides) -> ml_collections.ConfigDict:
  """A model: a transformers directory, or a preset (+ overrides) initialised at random."""
  group = _Group(
    {
      "path": "",  # transformers save_pretrained directory; empty: use the preset
      "preset": "",  # e.g. "t5-small", "gpt2", "qwen2-0.5b"
      # Preset fields to change, a dict: c.slm.overrides = dict(num_layers=2) in a config
      # file, --config.slm.overrides="{'num_layers': 2}" on the command line (the whole dict;
      # --config.slm.overrides.num_layers=3 changes a key the config file already set).
      "overrides": ml_collections.ConfigDict(),
      "dtype": "float32",  # params as loaded: float32 | bfloat16
      "rules": "replicated",  # logical-axis rules: replicated | fsdp_tensor
    }
  )
  group.update(overrides)
  return group


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(
    {
      # "hybrid": frozen LLM encoder + projector + SLM (the paper's method);
      # "plain": one model (`slm` group) trained alone, e.g. the LLM or the SLM baseline.
      "kind": "hybrid",
      "mode": "add",  # add | replace
    }
  )
  c.llm = _model_group()
  c.slm = _model_group()
  c.projector = ml_collections.ConfigDict(
    {
      "hidden": 0,  # 0: the SLM's width, as in the paper
      "zero_init_out": False,
    }
  )
  c.opt = _Group(
    {
      "learning_rate": 1e-3,
      "schedule": "cosine",  # cosine | linear | constant
      "warmup_steps": -1,  # -1: warmup_fraction of the steps
      "warmup_fraction": 0.03,
      "end_lr_fraction": 0.0,
      "weight_decay": 0.0,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "clip_norm": 1.0,  # 0: no clipping
      # (regex, factor) pairs: a param whose path ("decoder/layers_0/mlp/wo") matches a
      # regex learns at factor x the learning rate (the first match wins), e.g. muP's
      # 1/width for the FFN output of a widened model: (("/wo$", 0.03125),), on the command
      # line --config.opt.lr_multipliers="(('/wo$', 0.03125),)". Pairs, not a dict: the
      # order matters, and a ConfigDict sorts its keys and refuses '.' in them.
      "lr_multipliers": (),
      "grad_accum": 1,  # micro-batches per optimizer step
      "label_smoothing": 0.0,
    }
  )
  c.train = _TrainGroup(
    {
      "steps": 1000,
      "batch_size": 32,  # global, per optimizer step
      "compute_dtype": "float32",  # float32 | bfloat16 (params stay float32)
      "remat": False,  # recompute each layer's activations in the backward pass (memory for FLOPs)
      "log_every": 50,
      "eval_every": 500,  # 0: never
      "eval_batches": 8,
      "checkpoint_every": 500,
      "keep_checkpoints": 3,
    }
  )
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.collab = collab_group()
  c.data = get_default_data_config()
  c.decode = ml_collections.ConfigDict(
    {
      # greedy | sample | beam | speculative | contrastive | proxy | routed; the last four
      # decode with `collab` (System 2) beside the configured model (System 1).
      "method": "greedy",
      "max_new_tokens": 64,
      "min_new_tokens": 0,  # stop ids are suppressed before this many tokens
      "stop_ids": (),  # ids that end a row, beside the tokenizer's EOS
      # Sampling (method sample, or a collaborative method drawing its tokens): temperature
      # 0 chooses the most likely token; > 0 draws at that temperature, then top_k (0: all)
      # and top_p (1.0: all).
      "temperature": 0.0,
      "top_k": 0,
      "top_p": 1.0,
      "seed": 0,
      "num_beams": 1,  # method beam: >= 2
      "length_penalty": 1.0,
      "batch_size": 32,
      "split": "validation",
      "max_examples": 0,  # 0: the whole split
      "batch1_examples": 0,  # also time this many examples one at a time
      "params": "checkpoint",  # checkpoint | initial (as built) | export:DIR
      # Weights every decoding model multiplies by: "stored" (their dtype) or "int8"
      # (weight-only, a scale per output channel, with qwix: l2s_jax/quantize.py).
      "weights": "stored",
      "checkpoint_step": 0,  # 0: the latest
      # An unreadable checkpoint is an error; True: use the newest readable earlier step.
      "checkpoint_fallback": False,
    }
  )
  c.lock()  # config files and --config.x=y may change values, never add fields
  return c


def _source_group() -> ml_collections.ConfigDict:
  """Where a model comes from: a transformers directory, a preset, or a trained workdir."""
  group = _model_group()
  group.workdir = ""  # a workdir this project trained (its checkpoint says the config)
  return group


def collab_group() -> ml_collections.ConfigDict:
  """System 2 of the collaborative methods, and their parameters."""
  group = _source_group()  # the large model: path | preset (+ overrides) | workdir
  group.update(
    {
      "gamma": 5,  # speculative: drafts per verify pass (the most, if adaptive)
      "adaptive": False,  # speculative: gamma +2 after a full acceptance, else -1
      # speculative, greedy: > 0 is BiLD's rollback (lossy): a draft is also kept when the
      # LLM's cross-entropy on it is <= this many nats. 0: lossless.
      "rollback": 0.0,
      "contrastive_alpha": 0.1,  # contrastive: plausible tokens p_L >= alpha max p_L
      "contrastive_beta": 0.5,
      "contrastive_form": "fsgen",  # fsgen: log p_S + beta (log p_L - log p_S); li: log p_L - beta log p_S
      "proxy_alpha": 1.0,  # proxy: log p_L + alpha (log p_S - log p_base)
      "router": "top1",  # routed: never | always | top1 | margin | entropy | svm
      # routed, fire when: top1 p1 < t; margin p1 - p2 < t (t in [0, 1]; half: [0, 0.5]);
      # entropy H > t nats (threshold_range)
      "router_threshold": 0.5,
      "router_margin": "difference",  # margin: p1 - p2 | half: FS-GEN's (p1 - p2) / 2
      "router_svm": "",  # svm: a router file (l2s_jax/collab/svm_router.py save())
      "router_chunk": 8,  # routed: pending tokens System 2 reads per pass when called
    }
  )
  group.base = _source_group()  # proxy: the small model before its tuning
  return group


def validate(config: ml_collections.ConfigDict) -> None:
  """Every field must be declared in `base_config()` with a value of its type."""
  _compare(base_config(), config, "")
  if config.model.kind not in ("hybrid", "plain"):
    raise ValueError(f"model.kind {config.model.kind!r}: use 'hybrid' or 'plain'")
  if config.model.mode not in ("add", "replace"):
    raise ValueError(f"model.mode {config.model.mode!r}: use 'add' or 'replace'")
  if config.opt.schedule not in ("cosine", "linear", "constant"):
    raise ValueError(f"opt.schedule {config.opt.schedule!r}: use cosine, linear or constant")
  if config.opt.grad_accum < 1 or config.train.batch_size % config.opt.grad_accum:
    raise ValueError(
      f"train.batch_size={config.train.batch_size} must be a multiple of "
      f"opt.grad_accum={config.opt.grad_accum} (>= 1)"
    )
  lr_multipliers(config.opt)
  if config.train.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype {config.train.compute_dtype!r}: float32 or bfloat16")
  metrics.check_task_type(config.data.task_type, "data.task_type")
  for group in ("llm", "slm"):
    g = config[group]
    if (group == "slm" or config.model.kind == "hybrid") and not (g.path or g.preset):
      raise ValueError(f"{group}: set {group}.path (a transformers directory) or {group}.preset")
  validate_decode(config)


def json_object(text: str, field: str) -> dict:
  """A config string holding a JSON object, parsed ("" is {}); errors name `field`."""
  if not text:
    return {}
  try:
    out = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{field} is not JSON: {text!r} ({e})") from e
  if not isinstance(out, dict):
    raise ValueError(f"{field} must be a JSON object, got {text!r}")
  return out


def lr_multipliers(opt: ml_collections.ConfigDict) -> dict[str, float]:
  """opt.lr_multipliers checked: {regex: factor > 0}, in their order (the first match wins)."""
  rules = {}
  for entry in structured("lr_multipliers", opt.lr_multipliers, "opt.lr_multipliers"):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(
        f"opt.lr_multipliers entry {entry!r}: each is a (regex, factor) pair, "
        "e.g. opt.lr_multipliers = (('/mlp/wo$', 0.5), ('^head', 2.0))"
      )
    pattern, factor = entry
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"opt.lr_multipliers: bad regex {pattern!r} ({e})") from e
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
      raise ValueError(f"opt.lr_multipliers: factor {factor!r} of {pattern!r} must be a number > 0")
    if pattern in rules:
      raise ValueError(f"opt.lr_multipliers: {pattern!r} is given twice")
    rules[pattern] = float(factor)
  return rules


def structured(field: str, value, name: str | None = None, *, warn: bool = True):
  """`value` of a STRUCTURED_FIELDS field in its one form: a model group's `overrides` a
  dict (a copy), `opt.lr_multipliers` a tuple of (regex, factor) pairs (one bare pair taken
  as the only one). The old form, a JSON object in a string, is parsed, with a FutureWarning
  that shows the new form when `warn`. Anything else is returned as it is, for `validate` to
  name. `name`: the dotted field, for messages."""
  name = name or ("opt.lr_multipliers" if field == "lr_multipliers" else field)
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, str):
    text, parsed = value, json_object(value, name)
    value = parsed if field == "overrides" else tuple(parsed.items())
    if warn:
      shown = name if "." in name else f"<group>.{name}"
      warnings.warn(
        f"{shown} as a JSON string ({text!r}) is deprecated: give "
        f"the structure itself, c.{shown} = {value!r} in a config file, "
        f'--config.{shown}="{value!r}" on the command line',
        FutureWarning,
        stacklevel=_caller_stacklevel(),
      )
    return value
  if field == "overrides":
    return dict(value) if isinstance(value, dict) else value
  if isinstance(value, (tuple, list)):
    if (
      len(value) == 2
      and isinstance(value[0], str)
      and isinstance(value[1], (int, float))
      and not isinstance(value[1], bool)
    ):
      value = (value,)  # ("/wo$", 0.5): one pair
    return tuple(tuple(e) if isinstance(e, list) else e for e in value)
  return value


def _caller_stacklevel() -> int:
  """warnings.warn's stacklevel of the first caller outside this module and ml_collections
  (the line of the config file that set the field)."""
  frame, level = sys._getframe(2), 2
  while frame is not None and (
    frame.f_code.co_filename == __file__ or "ml_collections" in frame.f_code.co_filename
  ):
    frame, level = frame.f_back, level + 1
  return level


class _Group(ml_collections.ConfigDict):
  """A config group whose STRUCTURED_FIELDS are read into their one form as they are set,
  from a config file, the command line or a checkpoint's fingerprint (`structured`).
  RETIRED: {field: message} of fields this version dropped; setting one is an error."""

  RETIRED: dict[str, str] = {}

  def __setitem__(self, key, value):
    if key in self.RETIRED:
      raise AttributeError(self.RETIRED[key])
    if key in STRUCTURED_FIELDS:
      value = structured(key, value)
      if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    super().__setitem__(key, value)

  def __getitem__(self, key):
    if key in self.RETIRED and key not in self._fields:
      raise KeyError(self.RETIRED[key])
    return super().__getitem__(key)


class _TrainGroup(_Group):
  RETIRED = {
    "seed": "train.seed is no longer a field (it was never read): `seed` (config.seed) "
    "seeds the params' initialisation and data.seed the data order; set those"
  }


def _compare(reference, config, prefix: str) -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      raise ValueError(f"unknown config field {name!r}")
    ref_v, v = reference[key], config[key]
    if key in STRUCTURED_FIELDS and isinstance(ref_v, ml_collections.ConfigDict):
      if not isinstance(v, ml_collections.ConfigDict):  # free-form: any preset fields
        raise ValueError(f"config field {name!r} must be a dict, got {v!r}")
    elif isinstance(ref_v, ml_collections.ConfigDict):
      if not isinstance(v, ml_collections.ConfigDict):
        raise ValueError(f"config field {name!r} must be a group, got {v!r}")
      _compare(ref_v, v, name + ".")
    elif (
      ref_v is not None
      and v is not None
      and not isinstance(v, type(ref_v))
      and not (isinstance(ref_v, float) and isinstance(v, int))
      and not (isinstance(ref_v, (tuple, list)) and isinstance(v, (tuple, list)))
    ):
      raise ValueError(f"config field {name!r} = {v!r} should be a {type(ref_v).__name__}")
