"""Jitted batch evaluation: decode a split, score it, time it, write JSON.

`evaluate(config, workdir)` has the run assembled for evaluation
(`l2s_jax.assemble.for_evaluation`: the trained params alone from the latest
checkpoint, or from an export, or the model as configured, e.g. a plain
LLM; every param, the frozen LLM's included, placed on `config.mesh` by the
training rules), decodes the evaluation split in jitted batches split over
the mesh's data axes (greedy or beam search), detokenizes, scores with
sacrebleu (BLEU, chrF) or rouge-score (ROUGE-1/2/L/Lsum), and writes
`DIR/eval/<split>-<step>[.<method>].json` plus a predictions file with the index,
prompt, reference and hypothesis of every example. Padding rows that fill
the last batch never reach the metric. With several processes, each decodes
the same batches on its share of the mesh; process 0 writes the files.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from l2s_jax import assemble, files, methods, metrics
from l2s_jax.decoding.spec import sum_stats
from l2s_jax.eval_progress import ProgressLog
from l2s_jax.models import adapter_for
from l2s_jax.models.adapters import batch_prompts


def _rows_for_padding_rows(ids, mask):
  """Padding rows (all-zero masks) get one dummy token so they can run with the batch."""
  empty = mask.sum(axis=1) == 0
  if empty.any():
    mask = mask.copy()
    mask[empty, 0] = 1
  return ids, mask


class Decoder:
  """Decodes batches with a method (`l2s_jax.methods`); times each call, compiles apart."""

  def __init__(self, method, pipeline):
    self.method, self.pipeline = method, pipeline
    self.eos = pipeline.tokenizer.eos_id
    self.adapter = adapter_for(method.model)
    self.seen_shapes: set = set()
    self.compile_s = 0.0
    self.calls = 0

  def __call__(self, batch: dict):
    """(Decoded, seconds) of one batch (padding rows included)."""
    ids, mask = _rows_for_padding_rows(*self.adapter.prompt(batch))
    extra = self.adapter.prompt_extras(batch, ids.shape[1])
    if extra:
      extra["llm_input_ids"], extra["llm_attention_mask"] = _rows_for_padding_rows(
        extra["llm_input_ids"], extra["llm_attention_mask"]
      )
    rng = methods.batch_rng(self.method.config, self.calls)
    self.calls += 1
    run = lambda: self.method(ids, mask, extra, rng)
    key = (ids.shape, tuple(sorted((k, np.shape(v)) for k, v in extra.items())))
    if key not in self.seen_shapes:  # first call of a shape: compile, apart
      self.seen_shapes.add(key)
      t0 = time.perf_counter()
      run()
      self.compile_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def hypothesis_text(pipeline, tokens_row, length, eos) -> str:
  ids = [int(t) for t in tokens_row[:length]]
  if ids and ids[-1] == eos:
    ids = ids[:-1]
  return pipeline.decode(ids)


def prompt_batch(pipeline, split: str, examples: int):
  """(ids, mask, references) of the first `examples` prompts of a split, one host batch."""
  with pipeline.iterator(
    split, shuffle=False, repeat=False, batch_size=examples, max_examples=examples
  ) as it:
    batch = next(it)
  keep = batch["example_index"] >= 0
  ids, mask = batch_prompts(batch, pipeline.model_kind)
  source = pipeline.source(split)
  refs = [source[int(i)]["target"] for i in batch["example_index"][keep]]
  return ids[keep], mask[keep], refs


def decode_split(
  method,
  pipeline,
  split: str,
  *,
  batch_size: int,
  max_examples: int,
  desc: str = "eval",
  progress: ProgressLog | None = None,
) -> dict:
  """Decodes a split with `method`; returns the rows (index, prompt, reference or None,
  hypothesis), the method's statistics over them, and timings.

  progress: batches finished in an earlier, interrupted run are taken from it instead of
  decoded again, and each batch decoded here is added to it.
  """
  decoder = Decoder(method, pipeline)
  source = pipeline.source(split)
  it = pipeline.iterator(
    split, shuffle=False, repeat=False, batch_size=batch_size, max_examples=max_examples
  )
  records = list(progress.restored) if progress else []
  total = -(-it.size // batch_size)
  # Batches finished before an interruption are not built again; the next batch is built
  # (the data's workers or thread) while the device decodes this one.
  it.set_state({**it.get_state(), "batches": len(records)})
  bar = tqdm(
    it,
    total=total,
    desc=desc,
    unit="batch",
    initial=len(records),
    disable=None if jax.process_index() == 0 else True,
  )
  for i, batch in enumerate(bar, start=len(records)):
    out, seconds = decoder(batch)
    keep = batch["example_index"] >= 0  # padding rows never reach the metric
    rows = []
    for r in np.flatnonzero(keep):
      index = int(batch["example_index"][r])
      example = source[index]
      rows.append(
        {
          "index": index,
          "prompt": example["prompt"],
          "reference": example["target"],
          "length": int(out.lengths[r]),
          "hypothesis": hypothesis_text(pipeline, out.tokens[r], int(out.lengths[r]), decoder.eos),
        }
      )
    record = {
      "batch": i,
      "seconds": seconds,
      "rows": rows,
      "stats": {k: np.asarray(v)[keep].tolist() for k, v in out.stats.items()},
      "batch_stats": out.batch_stats,
    }
    records.append(record)
    if progress:
      progress.append(record)
  rows = [row for rec in records for row in rec["rows"]]
  latencies = [rec["seconds"] for rec in records]
  # Per-row counts ([rows] or [rows, ...]; every batch holds a real row) and per-call counts,
  # summed into the method's report numbers.
  stats, batch_stats = sum_stats(
    [rec["stats"] for rec in records], [rec.get("batch_stats", {}) for rec in records]
  )
  return {
    "rows": rows,
    "batch_latencies_s": latencies,
    "decode_s": sum(latencies),
    "compile_s": decoder.compile_s,
    "generated_tokens": sum(r["length"] for r in rows),
    "batch_size": batch_size,
    "resumed_batches": len(progress.restored) if progress else 0,
    "method_stats": method.summary(stats, batch_stats) if stats else {},
  }


def _speed(d: dict) -> dict:
  n = len(d["rows"])
  lat = d["batch_latencies_s"]
  return {
    "batch_size": d["batch_size"],
    "examples": n,
    "decode_s": d["decode_s"],
    "compile_s": d["compile_s"],
    "prompts_per_s": n / max(d["decode_s"], 1e-9),
    "generated_tokens": d["generated_tokens"],
    "generated_tokens_per_s": d["generated_tokens"] / max(d["decode_s"], 1e-9),
    "latency_per_batch_s": {"mean": statistics.mean(lat), "median": statistics.median(lat)},
    "latency_per_example_s": d["decode_s"] / max(n, 1),
    **({"resumed_batches": d["resumed_batches"]} if d["resumed_batches"] else {}),
    **({"method_stats": d["method_stats"]} if d["method_stats"] else {}),
  }


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict:
  """Decodes `config.decode.split` with `config.decode.method`, scores it (when the split
  has references), writes (process 0) and returns the results.

  mesh: instead of `config.mesh` over all devices (e.g. a sub-mesh, in tests).
  """
  run = assemble.for_evaluation(config, workdir, mesh)
  method = methods.build(config, run)
  d = config.decode
  pipeline = run.pipeline
  out_dir = os.path.join(workdir, "eval")
  # greedy on a checkpoint: <split>-<step>; other params sources and methods add their names,
  # so runs do not overwrite each other.
  source = d.params.split(":", 1)[0]
  name = (
    f"{d.split}-{run.step}"
    + ("" if source == "checkpoint" else f".{source}")
    + ("" if d.method == "greedy" else f".{d.method}")
    + ("" if d.weights == "stored" else f".{d.weights}")
  )
  progress = ProgressLog(
    os.path.join(out_dir, f"{name}.progress.jsonl"),
    # format 2: per-row stats under the decoding specs' names, per-call batch_stats beside
    # them; a log of an older format starts over.
    {"config": config.to_dict(), "step": run.step, "format": 2},
  )
  result = decode_split(
    method,
    pipeline,
    d.split,
    batch_size=d.batch_size,
    max_examples=d.max_examples,
    progress=progress,
  )
  hyps = [r["hypothesis"] for r in result["rows"]]
  refs = [r["reference"] for r in result["rows"]]
  references = pipeline.has_targets(d.split)
  scores = metrics.scores_for_task(pipeline.task_type, hyps, refs) if references else {}
  speed = {"batched": _speed(result)}
  if d.batch1_examples:
    single = decode_split(
      method,
      pipeline,
      d.split,
      batch_size=1,
      max_examples=d.batch1_examples,
      desc="batch-1 latency",
    )
    speed["batch_1"] = _speed(single)
  report = {
    "split": d.split,
    "step": run.step,
    "examples": len(hyps),
    "references": references,
    "task_type": pipeline.task_type,
    "model": config.model.kind,
    "metrics": scores,
    "decode": describe_method(config),
    "speed": speed,
    "machine": {
      "devices": [str(x) for x in jax.devices()][:1],
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "backend": jax.default_backend(),
    },
    "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
    "param_bytes_per_device": assemble.param_bytes(run),
    "predictions_file": os.path.join(out_dir, f"{name}.predictions.jsonl"),
  }
  if jax.process_index() == 0:
    _write_results(out_dir, name, report, result["rows"])
  progress.close(finished=True)
  logging.info("eval %s: %s", name, {k: v for k, v in scores.items() if isinstance(v, float)})
  return report


def describe_method(config) -> dict:
  """The decoding settings that shaped the predictions, for the report."""
  d, co = config.decode, config.collab
  out = {
    "method": d.method,
    "max_new_tokens": d.max_new_tokens,
    "params": d.params,
    "weights": d.weights,
    "compute_dtype": config.train.compute_dtype,
    "stop_ids": list(d.stop_ids),
  }
  if d.method == "beam":
    out.update(num_beams=d.num_beams, length_penalty=d.length_penalty)
  if d.method not in ("greedy", "beam"):
    out.update(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, seed=d.seed)
  if d.min_new_tokens:
    out["min_new_tokens"] = d.min_new_tokens
  if d.method in ("speculative", "contrastive", "proxy", "routed"):
    source = {k: co[k] for k in ("path", "preset", "workdir") if co[k]}
    params = {
      "speculative": ("gamma", "adaptive"),
      "contrastive": ("contrastive_alpha", "contrastive_beta", "contrastive_form"),
      "proxy": ("proxy_alpha",),
      "routed": ("router", "router_threshold"),
    }[d.method]
    out["collab"] = {**source, **{k: co[k] for k in params}}
    if d.method == "proxy":
      out["collab"]["base"] = {k: co.base[k] for k in ("path", "preset", "workdir") if co.base[k]}
  return out


def _write_results(out_dir: str, name: str, report: dict, rows: list[dict]) -> None:
  """The predictions, texts and JSON report, each written whole (temporary file + rename)."""
  lines = []
  for r in rows:
    line = {"index": r["index"], "prompt": r["prompt"], "hypothesis": r["hypothesis"]}
    if report["references"]:
      line["reference"] = r["reference"]
    lines.append(json.dumps(line, ensure_ascii=False) + "\n")
  files.write_text(report["predictions_file"], "".join(lines))
  texts = {"hyp.txt": [r["hypothesis"] for r in rows]}
  if report["references"]:
    texts["ref.txt"] = [r["reference"] for r in rows]
  elif os.path.exists(os.path.join(out_dir, f"{name}.ref.txt")):
    os.remove(os.path.join(out_dir, f"{name}.ref.txt"))  # an earlier run's, not these rows'.
  for suffix, text in texts.items():
    files.write_text(
      os.path.join(out_dir, f"{name}.{suffix}"), "".join(t.replace("\n", " ") + "\n" for t in text)
    )
  files.write_json(os.path.join(out_dir, f"{name}.json"), report, indent=2)
