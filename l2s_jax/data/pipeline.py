"""One entry point from a config's `data` group to sources, tokenizers and batches."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile

import ml_collections

from l2s_jax import files
from l2s_jax.data import batching, loader, subword, synthetic, tfds as tfds_lib
from l2s_jax.data.jsonl import DataError, JsonlSource
from l2s_jax.data.tokenize import TextTokenizer, load_tokenizer, same_tokenizer


def get_default_data_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "source": "synthetic",  # synthetic | jsonl | tfds
      "task_type": "translation",  # translation | summarization | exact_match | gsm8k | multiple_choice
      "tfds_task": "wmt14_ende",  # wmt14_ende | wmt14_enfr | wmt16_enro | cnn_dailymail | xsum
      "tfds_data_dir": "",
      "prefix": "auto",  # auto: the task's T5 prefix (none for jsonl/synthetic)
      "jsonl_train": "",
      "jsonl_validation": "",
      "jsonl_test": "",
      "prompt_field": "prompt",
      "target_field": "target",
      "skip_bad_lines": False,
      # synthetic (word level) | byt5 | a transformers tokenizer directory | unigram[:V] /
      # byte_bpe[:V]: T5- / GPT-2-style, trained on the train split (l2s_jax.data.subword)
      "tokenizer": "synthetic",
      "llm_tokenizer": "",  # empty: the same as `tokenizer`
      "tokenizer_corpus": 5000,  # train-split examples a trained tokenizer learns from
      "max_prompt_len": 128,
      "max_target_len": 128,
      "prompt_buckets": (16, 32, 64, 128),
      "target_buckets": (16, 32, 64, 128),
      "seed": 0,
      # Batches are built in this many Grain worker processes (0: in this process, in a
      # background thread), `prefetch` batches ahead of the step that needs them.
      "workers": 0,
      "prefetch": 2,
      "synthetic": ml_collections.ConfigDict(dataclasses.asdict(synthetic.SyntheticTaskConfig())),
    }
  )


class SyntheticSource:
  def __init__(self, task: synthetic.SyntheticTask, split: str):
    self.task, self.split = task, split
    self._n = task.size(split)

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    return self.task.example(self.split, index)


class Pipeline:
  """Sources and tokenizers of one configured task; makes batch iterators."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    *,
    model_kind: str,
    hybrid: bool,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    workdir: str | None = None,
    agree_lengths=None,
  ):
    """agree_lengths: with several processes, {feature: longest} -> the maximum over all
    processes (a collective), so that their batches pad to the same widths."""
    if cfg.source not in ("synthetic", "jsonl", "tfds"):
      raise DataError(f"data.source {cfg.source!r}: use synthetic, jsonl or tfds")
    if model_kind not in (batching.ENCODER_DECODER, batching.DECODER_ONLY):
      raise ValueError(f"model_kind {model_kind!r}")
    self.cfg, self.model_kind, self.hybrid = cfg, model_kind, hybrid
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self.agree_lengths = agree_lengths
    self.task = None
    self.workdir = workdir
    self._sources: dict = {}
    if cfg.source == "synthetic":
      self.task = synthetic.SyntheticTask(synthetic.SyntheticTaskConfig(**cfg.synthetic.to_dict()))
    self.task_type = (
      tfds_lib.TASKS[cfg.tfds_task].task_type
      if cfg.source == "tfds" and cfg.tfds_task in tfds_lib.TASKS
      else cfg.task_type
    )
    self.tokenizer = self._tokenizer(cfg.tokenizer, workdir, "tokenizer")
    self.llm_tokenizer = None
    self.shared_tokenizer = True
    if hybrid:
      self.llm_tokenizer = (
        self.tokenizer
        if not cfg.llm_tokenizer
        else self._tokenizer(cfg.llm_tokenizer, workdir, "llm_tokenizer")
      )
      self.shared_tokenizer = same_tokenizer(self.tokenizer, self.llm_tokenizer)
      if not self.shared_tokenizer:
        for field, tok in (("tokenizer", self.tokenizer), ("llm_tokenizer", self.llm_tokenizer)):
          if not tok.has_offsets:
            raise DataError(
              f"data.{field} {getattr(cfg, field)!r} gives no character offsets (a pure-"
              f"Python tokenizer, {type(tok.hf).__name__}), but the two tokenizers differ "
              f"and the LLM's states are pooled onto SLM tokens by character span: use a "
              f"directory with a tokenizer.json (a `tokenizers`-backed tokenizer)"
            )
    self.vocab_size = self.tokenizer.vocab_size
    self.featurizer = batching.Featurizer(
      self.tokenizer,
      model_kind,
      cfg.max_prompt_len,
      cfg.max_target_len,
      llm_tokenizer=self.llm_tokenizer,
      shared_tokenizer=self.shared_tokenizer,
    )
    self.padder = batching.Padder(
      model_kind,
      self.tokenizer.pad_id,
      (self.llm_tokenizer or self.tokenizer).pad_id,
      tuple(cfg.prompt_buckets),
      tuple(cfg.target_buckets),
      hybrid=hybrid,
      overlaps=hybrid and not self.shared_tokenizer,
    )
    self._sources: dict = {}

  def _tokenizer(self, spec: str, workdir: str | None, field: str):
    trained = trained_tokenizer_spec(spec, field)
    if trained is not None:
      return self._trained_tokenizer(spec, *trained, workdir, field)
    if spec == "synthetic":
      if self.task is None:
        raise DataError("tokenizer 'synthetic' needs data.source='synthetic'")
      directory = os.path.join(workdir, "tokenizer") if workdir else None
      if directory is None:
        directory = tempfile.mkdtemp(prefix="l2s_synthetic_tokenizer_")
      return TextTokenizer(synthetic.build_tokenizer(self.task, directory), "synthetic")
    return load_tokenizer(spec)

  def _trained_tokenizer(
    self, spec: str, kind: str, vocab: int, workdir: str | None, field: str
  ) -> TextTokenizer:
    """The workdir's tokenizer of this spec, trained on the train split at first use (kept in
    WORKDIR/<field>, so evaluation and resumed runs read the same ids)."""
    directory = (
      os.path.join(workdir, field) if workdir else tempfile.mkdtemp(prefix=f"l2s_{kind}_tokenizer_")
    )
    marker = os.path.join(directory, "l2s_tokenizer.json")
    if os.path.exists(directory) and os.listdir(directory):
      if not os.path.exists(marker):
        raise DataError(
          f"data.{field} {spec!r}: {directory} holds another tokenizer (not one "
          f"this project trained); use a new workdir or data.{field}={directory!r}"
        )
      with open(marker) as f:
        made = json.load(f)
      if made.get("spec") != spec or made.get("corpus") != self.cfg.tokenizer_corpus:
        raise DataError(
          f"data.{field} {spec!r} (corpus {self.cfg.tokenizer_corpus}): the "
          f"workdir's tokenizer {directory} was trained as {made.get('spec')!r} "
          f"(corpus {made.get('corpus')}); use a new workdir"
        )
      return load_tokenizer(directory)
    src = self.source("train")
    n = min(len(src), self.cfg.tokenizer_corpus)
    if n == 0:
      raise DataError(f"data.{field} {spec!r} is trained on the train split, which is empty")
    texts = []
    for i in range(n):
      ex = src[i]
      texts.append(ex["prompt"])
      if ex.get("target") is not None:
        texts.append(ex["target"])
    tok = subword.train(kind, texts, vocab)
    subword.save(tok, directory)
    files.write_json(
      marker,
      {"spec": spec, "corpus": self.cfg.tokenizer_corpus, "examples": n, "vocab_size": len(tok)},
    )
    logging.info(
      "trained a %s tokenizer of %d ids on %d train examples: %s", kind, len(tok), n, directory
    )
    return TextTokenizer(tok, directory)

  def prefix(self) -> str:
    if self.cfg.prefix != "auto":
      return self.cfg.prefix
    if self.cfg.source == "tfds":
      return tfds_lib.TASKS[self.cfg.tfds_task].prefix
    return ""

  def source(self, split: str):
    if split not in self._sources:
      cfg = self.cfg
      if cfg.source == "synthetic":
        src = SyntheticSource(self.task, split)
      elif cfg.source == "jsonl":
        path = {
          "train": cfg.jsonl_train,
          "validation": cfg.jsonl_validation,
          "test": cfg.jsonl_test,
        }.get(split)
        if not path:
          raise DataError(f"no JSONL file for split {split!r} (set data.jsonl_{split})")
        src = JsonlSource(
          path,
          prompt_field=cfg.prompt_field,
          target_field=cfg.target_field,
          skip_bad_lines=cfg.skip_bad_lines,
          prefix=self.prefix(),
          index_dir=os.path.join(self.workdir, "jsonl_index") if self.workdir else None,
          random_access=split == "train",
        )
      else:
        src = tfds_lib.TfdsSource(
          cfg.tfds_task, split, data_dir=cfg.tfds_data_dir or None, prefix=self.prefix()
        )
      self._sources[split] = src
    return self._sources[split]

  def has_targets(self, split: str) -> bool:
    """False for a JSONL file of prompts alone (generation, no metric)."""
    return getattr(self.source(split), "has_targets", True) is not False

  def iterator(
    self,
    split: str,
    *,
    shuffle: bool,
    repeat: bool,
    batch_size: int | None = None,
    max_examples: int = 0,
  ) -> loader.Batches:
    return loader.Batches(
      self.source(split),
      self.featurizer,
      self.padder,
      batch_size or self.batch_size,
      seed=self.cfg.seed,
      shuffle=shuffle,
      repeat=repeat,
      process_index=self.process_index,
      process_count=self.process_count,
      max_examples=max_examples,
      agree_lengths=self.agree_lengths if self.process_count > 1 else None,
      workers=self.cfg.workers,
      prefetch=self.cfg.prefetch,
      name=f"{self.cfg.source} {split}",
    )

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


def trained_tokenizer_spec(spec: str, field: str = "tokenizer") -> tuple[str, int] | None:
  """(kind, vocab size) of a tokenizer to train ("unigram", "byte_bpe:512"), else None."""
  kind, _, size = spec.partition(":")
  if kind not in subword.KINDS:
    return None
  default = {"unigram": 1000, "byte_bpe": 1000}[kind]
  try:
    vocab = int(size) if size else default
  except ValueError:
    vocab = -1
  if vocab < 8:
    raise DataError(
      f"data.{field} {spec!r}: the vocabulary size after ':' must be an "
      f"integer >= 8, e.g. '{kind}:{default}'"
    )
  return kind, vocab


def build_pipeline(
  cfg: ml_collections.ConfigDict,
  *,
  model_kind: str,
  hybrid: bool,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  workdir: str | None = None,
  agree_lengths=None,
) -> Pipeline:
  pipeline = Pipeline(
    cfg,
    model_kind=model_kind,
    hybrid=hybrid,
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    workdir=workdir,
    agree_lengths=agree_lengths,
  )
  logging.info(
    "data: %s (%s), tokenizer %s with %d ids%s",
    cfg.source,
    pipeline.task_type,
    cfg.tokenizer,
    pipeline.vocab_size,
    "" if pipeline.shared_tokenizer else f", LLM tokenizer {cfg.llm_tokenizer}",
  )
  return pipeline
