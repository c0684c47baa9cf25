"""The one declaration of every config field, with its default.

Config files in `configs/` start from `base_config()` and change values; a
field that is not declared here is an error (a typo must not be silently
ignored), and so is a value of the wrong type.
"""

from __future__ import annotations

import hashlib
import json
import re

import ml_collections

from l2s_jax import metrics

# Groups whose values decide what a checkpoint contains and how training
# continues; a workdir's checkpoint is only resumed under the same values.
RESUME_GROUPS = ("model", "llm", "slm", "projector", "opt", "data")
RESUME_TRAIN_FIELDS = ("batch_size", "seed", "compute_dtype")


METHODS = ("greedy", "sample", "beam", "speculative", "contrastive", "proxy", "routed")
COLLAB_METHODS = ("speculative", "contrastive", "proxy", "routed")
ROUTERS = ("never", "always", "top1", "margin", "entropy", "svm")   # l2s_jax.collab.combine.Router
WEIGHTS = ("stored", "int8")           # decode.weights: as stored, or int8 weight-only (qwix)
MARGIN_FORMS = ("difference", "half")     # margin router: p1 - p2, or FS-GEN's (p1 - p2) / 2
TOP_RECORDED = 8      # the SLM's top-k probabilities an oracle run records (SVM features)


def _model_group(**overrides) -> ml_collections.ConfigDict:
  """A model: a transformers directory, or a preset (+ overrides) initialised at random."""
  group = ml_collections.ConfigDict({
      "path": "",          # transformers save_pretrained directory; empty: use the preset
      "preset": "",        # e.g. "t5-small", "gpt2", "qwen2-0.5b"
      "overrides": "",     # JSON object of preset fields to change, e.g. '{"num_layers": 2}'
      "dtype": "float32",  # params as loaded: float32 | bfloat16
      "rules": "replicated",  # logical-axis rules: replicated | fsdp_tensor
  })
  group.update(overrides)
  return group


def base_config() -> ml_collections.ConfigDict:
  from l2s_jax.data import get_default_data_config  # local: data imports are heavier

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({
      # "hybrid": frozen LLM encoder + projector + SLM (the paper's method);
      # "plain": one model (`slm` group) trained alone, e.g. the LLM or the SLM baseline.
      "kind": "hybrid",
      "mode": "add",       # add | replace
  })
  c.llm = _model_group()
  c.slm = _model_group()
  c.projector = ml_collections.ConfigDict({
      "hidden": 0,                  # 0: the SLM's width, as in the paper
      "zero_init_out": False,
  })
  c.opt = ml_collections.ConfigDict({
      "learning_rate": 1e-3,
      "schedule": "cosine",         # cosine | linear | constant
      "warmup_steps": -1,           # -1: warmup_fraction of the steps
      "warmup_fraction": 0.03,
      "end_lr_fraction": 0.0,
      "weight_decay": 0.0,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "clip_norm": 1.0,             # 0: no clipping
      # JSON {regex: factor}: a param whose path ("decoder/layers_0/mlp/wo") matches a
      # regex learns at factor x the learning rate (first match wins), e.g. muP's
      # 1/width for the FFN output of a widened model: '{"/wo$": 0.03125}'.
      "lr_multipliers": "",
      "grad_accum": 1,              # micro-batches per optimizer step
      "label_smoothing": 0.0,
  })
  c.train = ml_collections.ConfigDict({
      "steps": 1000,
      "batch_size": 32,             # global, per optimizer step
      "compute_dtype": "float32",   # float32 | bfloat16 (params stay float32)
      "log_every": 50,
      "eval_every": 500,            # 0: never
      "eval_batches": 8,
      "checkpoint_every": 500,
      "keep_checkpoints": 3,
      "seed": 0,
  })
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.collab = collab_group()
  c.data = get_default_data_config()
  c.decode = ml_collections.ConfigDict({
      # greedy | sample | beam | speculative | contrastive | proxy | routed; the last four
      # decode with `collab` (System 2) beside the configured model (System 1).
      "method": "greedy",
      "max_new_tokens": 64,
      "min_new_tokens": 0,          # stop ids are suppressed before this many tokens
      "stop_ids": (),               # ids that end a row, beside the tokenizer's EOS
      # Sampling (method sample, or a collaborative method drawing its tokens): temperature
      # 0 chooses the most likely token; > 0 draws at that temperature, then top_k (0: all)
      # and top_p (1.0: all).
      "temperature": 0.0,
      "top_k": 0,
      "top_p": 1.0,
      "seed": 0,
      "num_beams": 1,               # method beam: >= 2
      "length_penalty": 1.0,
      "batch_size": 32,
      "split": "validation",
      "max_examples": 0,            # 0: the whole split
      "batch1_examples": 0,         # also time this many examples one at a time
      "params": "checkpoint",       # checkpoint | initial (as built) | export:DIR
      # Weights every decoding model multiplies by: "stored" (their dtype) or "int8"
      # (weight-only, a scale per output channel, with qwix: l2s_jax/quantize.py).
      "weights": "stored",
      "checkpoint_step": 0,         # 0: the latest
      # An unreadable checkpoint is an error; True: use the newest readable earlier step.
      "checkpoint_fallback": False,
  })
  c.lock()   # config files and --config.x=y may change values, never add fields
  return c


def threshold_range(kind: str, margin_form: str = "difference") -> tuple[float, float]:
  """[low, high] of a router's threshold: top1 a probability, margin a difference of two
  (half as wide in FS-GEN's (p1 - p2) / 2 form), entropy in nats."""
  if kind == "entropy":
    return 0.0, float("inf")
  return 0.0, 0.5 if kind == "margin" and margin_form == "half" else 1.0


def check_router_margin(co: ml_collections.ConfigDict) -> None:
  if co.router_margin not in MARGIN_FORMS:
    raise ValueError(f"collab.router_margin {co.router_margin!r}: use one of "
                     f"{', '.join(MARGIN_FORMS)}")


SLM_SOURCE = re.compile(
    r"(?:(?P<name>[A-Za-z0-9][\w.-]*)=)?(?P<kind>workdir|path|preset):(?P<value>.+)")
STUDY_FITS = ("trained", "all")


def study_config() -> ml_collections.ConfigDict:
  """A collaboration study (FS-GEN's): `base_config()` plus the `study` group.

  collab (path | preset | workdir) is the LLM; data and decode (split, max_examples,
  max_new_tokens, batch_size) say what is decoded; model / slm / opt / train are the recipe
  of the SLMs the study trains itself (one per `study.widths`, all with this one training
  budget, so the size ratio is the only variable).
  """
  c = base_config()
  with c.unlocked():
    c.study = ml_collections.ConfigDict({
        # SLMs to study as they are: "[name=]workdir:DIR" (trained here; a hybrid too),
        # "[name=]path:DIR" (a transformers directory) or "[name=]preset:NAME" (random).
        "slms": (),
        "widths": (),                 # SLMs trained from the recipe at these widths
        "fit_on": "trained",          # the scaling law's pairs: trained (one budget) | all
        # SLMs the routers sweep on (names); empty: every listed SLM, else the widest trained.
        "sweep_on": (),
        "top1": (0.3, 0.5, 0.7, 0.9),          # router thresholds swept (the LLM called at
        "margin": (0.2, 0.4, 0.6, 0.8),        # p1 < t, margin < t, H > t); the oracle run
        "entropy": (1.0, 0.5, 0.25, 0.1),      # (router always) and the SLM alone come free
        # FS-GEN's SVM router: "train" (fitted on an oracle run over svm_examples prompts of
        # svm_split, apart from the prompts it is evaluated on), "" (none), or a router file.
        "svm": "train",
        "svm_k": 8,                   # top-k probabilities it reads (<= 8 when trained here)
        "svm_kernel": "rbf",          # rbf | linear
        "svm_split": "train",
        "svm_examples": 200,
        "bins": 10,                   # relative-position bins of the interventions
    })
  c.lock()
  return c


def study_slms(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(name, kind, value) of each `study.slms` entry; names default to the directory's or
  preset's name and must be unique."""
  out = []
  for entry in config.study.slms:
    m = SLM_SOURCE.fullmatch(entry) if isinstance(entry, str) else None
    if m is None:
      raise ValueError(f"study.slms entry {entry!r}: use '[name=]workdir:DIR', "
                       "'[name=]path:DIR' or '[name=]preset:NAME'")
    name = m["name"] or re.sub(r"[^\w.-]", "_", m["value"].rstrip("/").split("/")[-1])
    out.append((name, m["kind"], m["value"]))
  names = [n for n, _, _ in out] + [f"slm_d{w}" for w in config.study.widths]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"study.slms: the name(s) {dup} are given twice; name entries "
                     "'NAME=kind:value'")
  return out


def validate_study(config: ml_collections.ConfigDict) -> None:
  """A study config: every field declared, the study group's values in range, the recipe a
  valid training config when the study trains SLMs."""
  _compare(study_config(), config, "")
  s = config.study
  slms = study_slms(config)
  if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in s.widths):
    raise ValueError(f"study.widths {tuple(s.widths)!r}: model widths, integers >= 1")
  if not slms and not s.widths:
    raise ValueError("a study needs SLMs: set study.slms and/or study.widths")
  if len(_sources(config.collab)) != 1:
    raise ValueError("the study's LLM: set exactly one of collab.workdir, collab.path, "
                     f"collab.preset (set: {_sources(config.collab) or 'none'})")
  if s.fit_on not in STUDY_FITS:
    raise ValueError(f"study.fit_on {s.fit_on!r}: use one of {', '.join(STUDY_FITS)}")
  names = {n for n, _, _ in slms} | {f"slm_d{w}" for w in s.widths}
  unknown = [n for n in s.sweep_on if n not in names]
  if unknown:
    raise ValueError(f"study.sweep_on names {unknown}, which are not among the study's SLMs "
                     f"{sorted(names)}")
  check_router_margin(config.collab)
  half = config.collab.router_margin == "half"
  for kind in ("top1", "margin", "entropy"):
    low, high = threshold_range(kind, config.collab.router_margin)
    bad = [t for t in s[kind] if not low <= t <= high]
    if bad:
      raise ValueError(f"study.{kind} thresholds {bad} out of range: they must lie in "
                       f"[{low}, {high}]" + (" for collab.router_margin='half'" if
                                             kind == "margin" and half else ""))
  if not (isinstance(s.svm_k, int) and s.svm_k >= 1):
    raise ValueError(f"study.svm_k={s.svm_k!r}: an integer >= 1")
  if s.svm == "train":
    if s.svm_k > TOP_RECORDED:
      raise ValueError(f"study.svm_k={s.svm_k}: an SVM trained here reads at most the "
                       f"{TOP_RECORDED} top probabilities the oracle run records")
    if s.svm_kernel not in ("rbf", "linear"):
      raise ValueError(f"study.svm_kernel {s.svm_kernel!r}: use rbf or linear")
    if s.svm_examples < 1:
      raise ValueError(f"study.svm_examples={s.svm_examples}: >= 1")
  if not (isinstance(s.bins, int) and s.bins >= 1):
    raise ValueError(f"study.bins={s.bins!r}: an integer >= 1")
  metrics.check_task_type(config.data.task_type, "data.task_type")
  validate(recipe(config))     # slm: the recipe, and the family the prompts are prepared for


def recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A study config's training recipe as a plain `base_config()` config (no study group)."""
  values = config.to_dict()
  values.pop("study", None)
  c = ml_collections.ConfigDict(values)
  c.lock()
  return c


def _source_group() -> ml_collections.ConfigDict:
  """Where a model comes from: a transformers directory, a preset, or a trained workdir."""
  group = _model_group()
  group.workdir = ""       # a workdir this project trained (its checkpoint says the config)
  return group


def collab_group() -> ml_collections.ConfigDict:
  """System 2 of the collaborative methods, and their parameters."""
  group = _source_group()  # the large model: path | preset (+ overrides) | workdir
  group.update({
      "gamma": 5,                   # speculative: drafts per verify pass (the most, if adaptive)
      "adaptive": False,            # speculative: gamma +2 after a full acceptance, else -1
      # speculative, greedy: > 0 is BiLD's rollback (lossy): a draft is also kept when the
      # LLM's cross-entropy on it is <= this many nats. 0: lossless.
      "rollback": 0.0,
      "contrastive_alpha": 0.1,     # contrastive: plausible tokens p_L >= alpha max p_L
      "contrastive_beta": 0.5,
      "contrastive_form": "fsgen",  # fsgen: log p_S + beta (log p_L - log p_S); li: log p_L - beta log p_S
      "proxy_alpha": 1.0,           # proxy: log p_L + alpha (log p_S - log p_base)
      "router": "top1",             # routed: never | always | top1 | margin | entropy | svm
      # routed, fire when: top1 p1 < t; margin p1 - p2 < t (t in [0, 1]; half: [0, 0.5]);
      # entropy H > t nats (threshold_range)
      "router_threshold": 0.5,
      "router_margin": "difference",  # margin: p1 - p2 | half: FS-GEN's (p1 - p2) / 2
      "router_svm": "",             # svm: a router file (l2s_jax/collab/svm_router.py save())
      "router_chunk": 8,            # routed: pending tokens System 2 reads per pass when called
  })
  group.base = _source_group()      # proxy: the small model before its tuning
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
    raise ValueError(f"train.batch_size={config.train.batch_size} must be a multiple of "
                     f"opt.grad_accum={config.opt.grad_accum} (>= 1)")
  lr_multipliers(config.opt)
  if config.train.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"train.compute_dtype {config.train.compute_dtype!r}: float32 or bfloat16")
  metrics.check_task_type(config.data.task_type, "data.task_type")
  for group in ("llm", "slm"):
    g = config[group]
    if (group == "slm" or config.model.kind == "hybrid") and not (g.path or g.preset):
      raise ValueError(f"{group}: set {group}.path (a transformers directory) or {group}.preset")
  validate_decode(config)


def _sources(group) -> list[str]:
  return [f for f in ("path", "preset", "workdir") if group[f]]


def validate_decode(config: ml_collections.ConfigDict) -> None:
  """The decoding method and its settings agree; nothing set is silently ignored."""
  d, co = config.decode, config.collab
  if d.method not in METHODS:
    raise ValueError(f"decode.method {d.method!r}: use one of {', '.join(METHODS)}")
  if d.weights not in WEIGHTS:
    raise ValueError(f"decode.weights {d.weights!r}: use one of {', '.join(WEIGHTS)}")
  if d.max_new_tokens < 1 or not 0 <= d.min_new_tokens <= d.max_new_tokens:
    raise ValueError(f"decode.max_new_tokens={d.max_new_tokens} must be >= 1 and "
                     f"decode.min_new_tokens={d.min_new_tokens} in [0, max_new_tokens]")
  if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in d.stop_ids):
    raise ValueError(f"decode.stop_ids {tuple(d.stop_ids)!r}: token ids (integers >= 0)")
  sampling = {k: d[k] for k, default in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0))
              if d[k] != default}
  if d.temperature < 0 or d.top_k < 0 or not 0.0 < d.top_p <= 1.0:
    raise ValueError(f"decode.temperature={d.temperature} must be >= 0, decode.top_k="
                     f"{d.top_k} >= 0 and decode.top_p={d.top_p} in (0, 1]")
  if d.method in ("greedy", "beam") and sampling:
    raise ValueError(f"decode.method={d.method!r} chooses tokens without sampling, so "
                     f"{', '.join(f'decode.{k}={v}' for k, v in sampling.items())} would be "
                     "ignored; use method 'sample' (or a collaborative method) to sample")
  if d.method != "greedy" and d.method != "beam" and d.temperature == 0 and (
      d.top_k or d.top_p != 1.0):
    raise ValueError("decode.top_k / decode.top_p filter a sampled distribution: set "
                     "decode.temperature > 0 as well")
  if d.method == "sample" and d.temperature <= 0:
    raise ValueError("decode.method='sample' needs decode.temperature > 0")
  if (d.method == "beam") != (d.num_beams > 1):
    raise ValueError(f"decode.num_beams={d.num_beams} with decode.method={d.method!r}: beam "
                     "search is method 'beam' with num_beams >= 2, and no other method "
                     "takes beams")
  if d.min_new_tokens and d.method in ("beam", "speculative"):
    raise ValueError(f"decode.min_new_tokens is not offered by decode.method={d.method!r}")
  if d.method not in COLLAB_METHODS:
    return
  if len(_sources(co)) != 1:
    raise ValueError(f"decode.method={d.method!r} decodes with System 2: set exactly one of "
                     f"collab.path, collab.preset, collab.workdir (set: {_sources(co) or 'none'})")
  if d.method == "speculative" and not (isinstance(co.gamma, int) and co.gamma >= 1):
    raise ValueError(f"collab.gamma={co.gamma}: speculative decoding drafts >= 1 token a pass")
  if co.rollback < 0:
    raise ValueError(f"collab.rollback={co.rollback}: a cross-entropy in nats, >= 0")
  if co.rollback > 0 and (d.method != "speculative" or d.temperature != 0):
    raise ValueError(f"collab.rollback={co.rollback} (BiLD) is a rule of greedy speculative "
                     f"decoding: decode.method='speculative', decode.temperature=0 (got "
                     f"{d.method!r}, {d.temperature})")
  if d.method == "contrastive":
    if not 0.0 < co.contrastive_alpha <= 1.0:
      raise ValueError(f"collab.contrastive_alpha={co.contrastive_alpha} must be in (0, 1]")
    if co.contrastive_form not in ("fsgen", "li"):
      raise ValueError(f"collab.contrastive_form {co.contrastive_form!r}: use fsgen or li")
  if d.method == "proxy" and len(_sources(co.base)) != 1:
    raise ValueError("decode.method='proxy' needs the small model before tuning: set exactly "
                     "one of collab.base.path, collab.base.preset, collab.base.workdir")
  if d.method == "routed":
    if co.router not in ROUTERS:
      raise ValueError(f"collab.router {co.router!r}: use one of {', '.join(ROUTERS)}")
    check_router_margin(co)
    t = co.router_threshold
    if co.router in ("top1", "margin", "entropy"):
      low, high = threshold_range(co.router, co.router_margin)
      if co.router == "entropy" and t < low:
        raise ValueError(f"collab.router_threshold={t}: an entropy in nats, >= 0")
      if not low <= t <= high:
        raise ValueError(f"collab.router_threshold={t} is a probability for router "
                         f"{co.router!r}: it must be in [{low:g}, {high:g}]")
    if (co.router == "svm") != bool(co.router_svm):
      raise ValueError(f"collab.router={co.router!r} with collab.router_svm="
                       f"{co.router_svm!r}: the svm router reads its file, no other does")
    if not (isinstance(co.router_chunk, int) and co.router_chunk >= 1):
      raise ValueError(f"collab.router_chunk={co.router_chunk!r} must be an integer >= 1")


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
  """opt.lr_multipliers parsed and checked: {regex: factor > 0}."""
  rules = json_object(opt.lr_multipliers, "opt.lr_multipliers")
  for pattern, factor in rules.items():
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"opt.lr_multipliers: bad regex {pattern!r} ({e})") from e
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
      raise ValueError(f"opt.lr_multipliers: factor {factor!r} of {pattern!r} must be a number > 0")
  return {k: float(v) for k, v in rules.items()}


def _compare(reference, config, prefix: str) -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      raise ValueError(f"unknown config field {name!r}")
    ref_v, v = reference[key], config[key]
    if isinstance(ref_v, ml_collections.ConfigDict):
      if not isinstance(v, ml_collections.ConfigDict):
        raise ValueError(f"config field {name!r} must be a group, got {v!r}")
      _compare(ref_v, v, name + ".")
    elif (ref_v is not None and v is not None and not isinstance(v, type(ref_v))
          and not (isinstance(ref_v, float) and isinstance(v, int))
          and not (isinstance(ref_v, (tuple, list)) and isinstance(v, (tuple, list)))):
      raise ValueError(f"config field {name!r} = {v!r} should be a {type(ref_v).__name__}")


def from_fingerprint(fp: dict) -> ml_collections.ConfigDict:
  """A config with the values a checkpoint's fingerprint holds (model, data, optimizer and
  the training fields that shape it); the rest at their defaults."""
  c = base_config()

  def fill(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise ValueError(f"the fingerprint holds {prefix}{key}, which this version does not know")
      if isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value
  fill(c, fp, "")
  return c


def resume_fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The values a checkpoint may only be resumed under, as a plain dict."""
  out = {g: config[g].to_dict() for g in RESUME_GROUPS}
  out["train"] = {k: config.train[k] for k in RESUME_TRAIN_FIELDS}
  return json.loads(json.dumps(out, sort_keys=True, default=str))


def fingerprint_digest(fp: dict) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def diff_fingerprints(saved: dict, current: dict, prefix: str = "", *,
                      names: tuple[str, str] = ("checkpoint", "config"),
                      defaults: dict | None = None) -> list[str]:
  """The fields that differ, dotted, with both values labelled by `names`. `defaults` (a
  fingerprint of `base_config()`): a field `saved` lacks (written before the field existed)
  is no difference while `current` holds its default."""
  out = []
  defaults = defaults or {}
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      sub = defaults.get(key) if isinstance(defaults.get(key), dict) else None
      out += diff_fingerprints(a, b, f"{prefix}{key}.", names=names, defaults=sub)
    elif key not in saved and key in defaults and defaults[key] == b:
      continue
    elif a != b:
      out.append(f"{prefix}{key}: {names[0]} {a!r} vs {names[1]} {b!r}")
  return out
