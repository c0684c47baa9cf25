"""Jitted batch evaluation: decode a split, score it, time it, write JSON.

`evaluate(config, workdir)` restores the trained params (or takes them from
an export, or uses the model as configured, e.g. a plain LLM), decodes the
evaluation split in jitted batches (greedy or beam search), detokenizes,
scores with sacrebleu (BLEU, chrF) or rouge-score (ROUGE-1/2/L/Lsum), and
writes `DIR/eval/<split>-<step>.json` plus a predictions file with the
prompt, reference and hypothesis of every example. Padding rows that fill
the last batch never reach the metric.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from l2s_jax import build as build_lib
from l2s_jax import config_schema, metrics, sharding
from l2s_jax.checkpoint import TrainCheckpoints, abstract_like
from l2s_jax.decoding import beam_search, generate
from l2s_jax.models import LLMToSLM
from l2s_jax.train_step import TrainState, make_optimizer


def restore_params(config, workdir: str, model, trainable, step: int | None = None):
  """(step, trainable params) from the workdir's checkpoints (latest, or `step`)."""
  ckpt = TrainCheckpoints(workdir, keep=max(config.train.keep_checkpoints, 1), async_save=False)
  try:
    step = step if step is not None else ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first, or set "
                              f"decode.params='initial' to evaluate the model as configured")
    tx, _ = make_optimizer(config.opt, config.train.steps)
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                   trainable)
    abstract = jax.eval_shape(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                             rng=jax.random.PRNGKey(0)), abstract_params)
    repl = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_like(abstract, jax.tree.map(lambda _: repl, abstract))
    state, _, _ = ckpt.restore(step, abstract)
    return int(step), state.params
  finally:
    ckpt.close()


def _prompts(batch: dict, model_kind: str):
  """(ids, mask) of the prompts alone, right-padded."""
  if model_kind == "encoder_decoder":
    return batch["inputs"], batch["inputs_mask"]
  lengths = batch["prompt_lengths"]
  width = max(int(lengths.max()), 1)
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  ids = batch["tokens"][:, :width] * mask
  return ids, mask


def _extra_inputs(batch: dict, prompt_width: int) -> dict:
  """The hybrid's LLM-side prefill inputs; overlap rows cut to the prompt width."""
  extra = {"llm_input_ids": batch["llm_inputs"], "llm_attention_mask": batch["llm_inputs_mask"]}
  if "overlap" in batch:
    extra["overlap"] = batch["overlap"][:, :prompt_width]
  return extra


def _rows_for_padding_rows(ids, mask):
  """Padding rows (all-zero masks) get one dummy token so they can run with the batch."""
  empty = mask.sum(axis=1) == 0
  if empty.any():
    mask = mask.copy()
    mask[empty, 0] = 1
  return ids, mask


class Decoder:
  """Decodes batches with the configured strategy; times each call."""

  def __init__(self, config, model, params, pipeline):
    self.config, self.model, self.params, self.pipeline = config, model, params, pipeline
    self.eos = pipeline.tokenizer.eos_id
    self.pad = pipeline.tokenizer.pad_id
    self.hybrid = isinstance(model, LLMToSLM)
    self.seen_shapes: set = set()
    self.compile_s = 0.0

  def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray, float]:
    d = self.config.decode
    ids, mask = _rows_for_padding_rows(*_prompts(batch, self.pipeline.model_kind))
    extra = _extra_inputs(batch, ids.shape[1]) if self.hybrid else {}
    if extra:
      extra["llm_input_ids"], extra["llm_attention_mask"] = _rows_for_padding_rows(
          extra["llm_input_ids"], extra["llm_attention_mask"])

    def run():
      if d.num_beams > 1:
        out = beam_search(self.model, self.params, ids, mask, max_new_tokens=d.max_new_tokens,
                          num_beams=d.num_beams, eos_id=self.eos, pad_id=self.pad,
                          length_penalty=d.length_penalty,
                          prompt_buckets=self.config.data.prompt_buckets, extra_inputs=extra)
      else:
        out = generate(self.model, self.params, ids, mask, max_new_tokens=d.max_new_tokens,
                       eos_id=self.eos, pad_id=self.pad,
                       prompt_buckets=self.config.data.prompt_buckets, extra_inputs=extra)
      return np.asarray(out.tokens), np.asarray(out.lengths)

    key = (ids.shape, tuple(sorted((k, np.shape(v)) for k, v in extra.items())))
    if key not in self.seen_shapes:            # first call of a shape: compile, apart
      self.seen_shapes.add(key)
      t0 = time.perf_counter()
      run()
      self.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens, lengths = run()
    return tokens, lengths, time.perf_counter() - t0


def _hypothesis(pipeline, tokens_row, length, eos) -> str:
  ids = [int(t) for t in tokens_row[:length]]
  if ids and ids[-1] == eos:
    ids = ids[:-1]
  return pipeline.decode(ids)


def decode_split(config, model, params, pipeline, split: str, *, batch_size: int,
                 max_examples: int, desc: str = "eval") -> dict:
  """Decodes a split; returns hypotheses, references, prompts and timings."""
  decoder = Decoder(config, model, params, pipeline)
  source = pipeline.source(split)
  it = pipeline.iterator(split, shuffle=False, repeat=False, batch_size=batch_size,
                         max_examples=max_examples)
  rows, latencies, generated = [], [], 0
  total = -(-it.size // batch_size)
  for batch in tqdm(it, total=total, desc=desc, unit="batch", disable=None):
    tokens, lengths, seconds = decoder(batch)
    latencies.append(seconds)
    for r, index in enumerate(batch["example_index"]):
      if index < 0:
        continue                      # padding rows never reach the metric
      generated += int(lengths[r])
      example = source[int(index)]
      rows.append({"index": int(index), "prompt": example["prompt"],
                   "reference": example["target"],
                   "hypothesis": _hypothesis(pipeline, tokens[r], int(lengths[r]),
                                             decoder.eos)})
  decode_s = sum(latencies)
  return {"rows": rows, "batch_latencies_s": latencies, "decode_s": decode_s,
          "compile_s": decoder.compile_s, "generated_tokens": generated,
          "batch_size": batch_size}


def _speed(d: dict) -> dict:
  n = len(d["rows"])
  lat = d["batch_latencies_s"]
  return {"batch_size": d["batch_size"], "examples": n, "decode_s": d["decode_s"],
          "compile_s": d["compile_s"], "prompts_per_s": n / max(d["decode_s"], 1e-9),
          "generated_tokens": d["generated_tokens"],
          "generated_tokens_per_s": d["generated_tokens"] / max(d["decode_s"], 1e-9),
          "latency_per_batch_s": {"mean": statistics.mean(lat), "median": statistics.median(lat)},
          "latency_per_example_s": d["decode_s"] / max(n, 1)}


def load_params_for_eval(config, workdir, model, frozen, trainable):
  """(step, full params) by `config.decode.params`."""
  source = config.decode.params
  if source == "checkpoint":
    step, trained = restore_params(config, workdir, model, trainable,
                                   step=config.decode.checkpoint_step or None)
  elif source == "initial":
    step, trained = 0, trainable
  elif source.startswith("export:"):
    from l2s_jax import export
    manifest, trained = export.load_params(source[len("export:"):])
    step = manifest.get("source_step") or 0
  else:
    raise ValueError(f"decode.params {source!r}: use 'checkpoint', 'initial' or 'export:DIR'")
  params = {**trained, "llm": frozen} if isinstance(model, LLMToSLM) else trained
  return step, params


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Decodes and scores `config.decode.split`; writes and returns the results."""
  from l2s_jax import data as data_lib
  from l2s_jax.train_lib import _slm_kind

  config_schema.validate(config)
  d = config.decode
  pipeline = data_lib.build_pipeline(config.data, model_kind=_slm_kind(config),
                                     hybrid=config.model.kind == "hybrid",
                                     batch_size=d.batch_size, workdir=workdir)
  model, frozen, trainable = build_lib.build(config, vocab_size=pipeline.vocab_size)
  model = build_lib.with_compute_dtype(model, config.train.compute_dtype)
  step, params = load_params_for_eval(config, workdir, model, frozen, trainable)
  params = jax.device_put(params, jax.devices()[0])
  result = decode_split(config, model, params, pipeline, d.split, batch_size=d.batch_size,
                        max_examples=d.max_examples)
  hyps = [r["hypothesis"] for r in result["rows"]]
  refs = [r["reference"] for r in result["rows"]]
  scores = metrics.scores_for_task(pipeline.task_type, hyps, refs)
  speed = {"batched": _speed(result)}
  if d.batch1_examples:
    single = decode_split(config, model, params, pipeline, d.split, batch_size=1,
                          max_examples=d.batch1_examples, desc="batch-1 latency")
    speed["batch_1"] = _speed(single)
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  name = f"{d.split}-{step}"
  report = {
      "split": d.split, "step": step, "examples": len(hyps), "task_type": pipeline.task_type,
      "model": config.model.kind, "metrics": scores,
      "decode": {"strategy": "beam" if d.num_beams > 1 else "greedy",
                 "num_beams": d.num_beams, "length_penalty": d.length_penalty,
                 "max_new_tokens": d.max_new_tokens, "params": d.params,
                 "compute_dtype": config.train.compute_dtype},
      "speed": speed, "machine": {"devices": [str(x) for x in jax.devices()][:1],
                                  "backend": jax.default_backend()},
      "predictions_file": os.path.join(out_dir, f"{name}.predictions.jsonl")}
  with open(report["predictions_file"], "w", encoding="utf-8") as f:
    for r in result["rows"]:
      f.write(json.dumps({"prompt": r["prompt"], "reference": r["reference"],
                          "hypothesis": r["hypothesis"]}, ensure_ascii=False) + "\n")
  for suffix, texts in (("hyp.txt", hyps), ("ref.txt", refs)):
    with open(os.path.join(out_dir, f"{name}.{suffix}"), "w", encoding="utf-8") as f:
      f.write("".join(t.replace("\n", " ") + "\n" for t in texts))
  with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  logging.info("eval %s: %s", name, {k: v for k, v in scores.items() if isinstance(v, float)})
  return report
