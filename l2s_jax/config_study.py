"""The schema of a collaboration study (FS-GEN's; `study.py`, l2s_jax/study_lib.py):
`base_config()` plus the `study` group, its checks, and the training recipe of the SLMs it
trains."""

from __future__ import annotations

import re

import ml_collections

from l2s_jax import config_decode, config_schema, metrics
from l2s_jax.collab.combine import TOP_RECORDED, threshold_range

SLM_SOURCE = re.compile(
  r"(?:(?P<name>[A-Za-z0-9][\w.-]*)=)?(?P<kind>workdir|path|preset):(?P<value>.+)"
)
STUDY_FITS = ("trained", "all")


def study_config() -> ml_collections.ConfigDict:
  """A collaboration study (FS-GEN's): `base_config()` plus the `study` group.

  collab (path | preset | workdir) is the LLM; data and decode (split, max_examples,
  max_new_tokens, batch_size) say what is decoded; model / slm / opt / train are the recipe
  of the SLMs the study trains itself (one per `study.widths`, all with this one training
  budget, so the size ratio is the only variable).
  """
  c = config_schema.base_config()
  with c.unlocked():
    c.study = ml_collections.ConfigDict(
      {
        # SLMs to study as they are: "[name=]workdir:DIR" (trained here; a hybrid too),
        # "[name=]path:DIR" (a transformers directory) or "[name=]preset:NAME" (random).
        "slms": (),
        "widths": (),  # SLMs trained from the recipe at these widths
        "fit_on": "trained",  # the scaling law's pairs: trained (one budget) | all
        # SLMs the routers sweep on (names); empty: every listed SLM, else the widest trained.
        "sweep_on": (),
        "top1": (0.3, 0.5, 0.7, 0.9),  # router thresholds swept (the LLM called at
        "margin": (0.2, 0.4, 0.6, 0.8),  # p1 < t, margin < t, H > t); the oracle run
        "entropy": (1.0, 0.5, 0.25, 0.1),  # (router always) and the SLM alone come free
        # FS-GEN's SVM router: "train" (fitted on an oracle run over svm_examples prompts of
        # svm_split, apart from the prompts it is evaluated on), "" (none), or a router file.
        "svm": "train",
        "svm_k": 8,  # top-k probabilities it reads (<= 8 when trained here)
        "svm_kernel": "rbf",  # rbf | linear
        "svm_split": "train",
        "svm_examples": 200,
        "bins": 10,  # relative-position bins of the interventions
      }
    )
  c.lock()
  return c


def study_slms(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(name, kind, value) of each `study.slms` entry; names default to the directory's or
  preset's name and must be unique."""
  out = []
  for entry in config.study.slms:
    m = SLM_SOURCE.fullmatch(entry) if isinstance(entry, str) else None
    if m is None:
      raise ValueError(
        f"study.slms entry {entry!r}: use '[name=]workdir:DIR', "
        "'[name=]path:DIR' or '[name=]preset:NAME'"
      )
    name = m["name"] or re.sub(r"[^\w.-]", "_", m["value"].rstrip("/").split("/")[-1])
    out.append((name, m["kind"], m["value"]))
  names = [n for n, _, _ in out] + [f"slm_d{w}" for w in config.study.widths]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(
      f"study.slms: the name(s) {dup} are given twice; name entries 'NAME=kind:value'"
    )
  return out


def validate_study(config: ml_collections.ConfigDict) -> None:
  """A study config: every field declared, the study group's values in range, the recipe a
  valid training config when the study trains SLMs."""
  config_schema._compare(study_config(), config, "")
  s = config.study
  slms = study_slms(config)
  if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in s.widths):
    raise ValueError(f"study.widths {tuple(s.widths)!r}: model widths, integers >= 1")
  if not slms and not s.widths:
    raise ValueError("a study needs SLMs: set study.slms and/or study.widths")
  if len(config_decode.sources(config.collab)) != 1:
    raise ValueError(
      "the study's LLM: set exactly one of collab.workdir, collab.path, "
      f"collab.preset (set: {config_decode.sources(config.collab) or 'none'})"
    )
  if s.fit_on not in STUDY_FITS:
    raise ValueError(f"study.fit_on {s.fit_on!r}: use one of {', '.join(STUDY_FITS)}")
  names = {n for n, _, _ in slms} | {f"slm_d{w}" for w in s.widths}
  unknown = [n for n in s.sweep_on if n not in names]
  if unknown:
    raise ValueError(
      f"study.sweep_on names {unknown}, which are not among the study's SLMs {sorted(names)}"
    )
  config_decode.check_router_margin(config.collab)
  half = config.collab.router_margin == "half"
  for kind in ("top1", "margin", "entropy"):
    low, high = threshold_range(kind, config.collab.router_margin)
    bad = [t for t in s[kind] if not low <= t <= high]
    if bad:
      raise ValueError(
        f"study.{kind} thresholds {bad} out of range: they must lie in "
        f"[{low}, {high}]"
        + (" for collab.router_margin='half'" if kind == "margin" and half else "")
      )
  if not (isinstance(s.svm_k, int) and s.svm_k >= 1):
    raise ValueError(f"study.svm_k={s.svm_k!r}: an integer >= 1")
  if s.svm == "train":
    if s.svm_k > TOP_RECORDED:
      raise ValueError(
        f"study.svm_k={s.svm_k}: an SVM trained here reads at most the "
        f"{TOP_RECORDED} top probabilities the oracle run records"
      )
    if s.svm_kernel not in ("rbf", "linear"):
      raise ValueError(f"study.svm_kernel {s.svm_kernel!r}: use rbf or linear")
    if s.svm_examples < 1:
      raise ValueError(f"study.svm_examples={s.svm_examples}: >= 1")
  if not (isinstance(s.bins, int) and s.bins >= 1):
    raise ValueError(f"study.bins={s.bins!r}: an integer >= 1")
  metrics.check_task_type(config.data.task_type, "data.task_type")
  # slm: the recipe, and the family the prompts are prepared for
  config_schema.validate(recipe(config))


def recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A study config's training recipe as a plain `base_config()` config (no study group)."""
  values = config.to_dict()
  values.pop("study", None)
  c = ml_collections.ConfigDict(values)
  c.lock()
  return c
