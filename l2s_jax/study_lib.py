"""The collaboration study (FS-GEN's): how often, where and at what cost an LLM must step in
for each of a list of SLMs, on any data, from a config (`config_study.study_config()`).

  python study.py --config configs/study_demo.py:/tmp/l2s_demo --workdir /tmp/l2s_demo/collab

The LLM is `collab` (a workdir, transformers directory or preset); the SLMs are the listed
`study.slms` (workdirs, the LLM-to-SLM hybrid included, directories, presets) and one SLM
per `study.widths`, trained here from the config's recipe (model / slm / opt / train: one
budget for all, so the size ratio is the only variable) into WORKDIR/slm_d<width>, reused
when finished. On the first `decode.max_examples` prompts of `decode.split` it measures:

  oracle run         the LLM consulted at every step (collab/combine.py): the collaboration
                     frequency (tokens where the LLM's choice differs from the SLM's), and
                     where those fall (`study.bins` relative-position bins)
  SLM / LLM alone    quality (`metrics.PRIMARY` of data.task_type) and timed greedy decoding
  router sweep       on `study.sweep_on`: routed decoding (collab/routed.py; the LLM runs
                     only where a row's router fires) for each threshold of top1, margin
                     (collab.router_margin: p1 - p2 or FS-GEN's (p1 - p2) / 2) and entropy,
                     and FS-GEN's SVM router (fitted on an oracle run over other prompts,
                     `study.svm_split`, or read from a file): quality, per-row and per-batch
                     LLM-call rates, seconds and the speedup over the LLM alone; lossless
                     speculative decoding (collab.gamma) beside them
  scaling law        y = b - a x^-alpha over the pairs' parameter ratios (`study.fit_on`),
                     with standard errors, residuals, the largest ratio held out and
                     predicted (>= 4 pairs); parameters on their bounds are reported as
                     "not a law"; fewer than 3 pairs: not fitted, and said why

Decoding runs in batches of `decode.batch_size` prompts, timed after a compiling run, so the
wall times are those of that batch size. Writes WORKDIR/study.json (every number),
positions.png, sweep_<slm>.png, scaling.png (only for a law) and svm_router_<slm>.json.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from l2s_jax import assemble, build, config_study, eval_lib, files, metrics, train_lib
from l2s_jax.collab import Combined, Routed, Router, Speculative, analysis, svm_router
from l2s_jax.decoding import Sample, decode, summarize
from l2s_jax.decoding.vocab import common_vocab
from l2s_jax.lock import WorkdirLock
from l2s_jax.models import count_params
from l2s_jax.models.adapters import adapter_for


def _decoding_params(model, params) -> int:
  """Parameters a model decodes with: a hybrid's projector and SLM (its frozen LLM encoder,
  which reads the prompt once, apart)."""
  return count_params(assemble.trainable_part(model, params))


def trained_slm_config(config: ml_collections.ConfigDict, width: int):
  """The recipe with the SLM at `width` (everything else, the training budget included,
  as configured)."""
  c = config_study.recipe(config)
  c.slm.overrides = build.resized_overrides(c.slm, width)
  return c


def train_slms(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """{name: workdir} of the SLMs the study trains (WORKDIR/slm_d<width>); finished ones are
  reused, interrupted ones resume."""
  out = {}
  for width in config.study.widths:
    c = trained_slm_config(config, width)
    path = os.path.join(workdir, f"slm_d{width}")
    summary = os.path.join(path, "train_summary.json")
    if not (os.path.isfile(summary) and json.load(open(summary)).get("step") == c.train.steps):
      logging.info("training an SLM of width %d for %d steps in %s", width, c.train.steps, path)
      train_lib.train_and_evaluate(c, path)
    out[f"slm_d{width}"] = path
  return out


class _Prompts:
  """The study's prompts in batches of decode.batch_size, and how to run and time a decoder
  over all of them."""

  def __init__(self, pipeline, split: str, examples: int, batch_size: int):
    self.pipeline = pipeline
    self.ids, self.mask, self.refs = eval_lib.prompt_batch(pipeline, split, examples)
    n = len(self.refs)
    self.batches = [
      (self.ids[i : i + batch_size], self.mask[i : i + batch_size]) for i in range(0, n, batch_size)
    ]

  def run(self, fn, *, timed: bool = False):
    """(outputs per batch, seconds or None). Timed: a second pass, after one that compiles
    every program the batches need (their prompt buckets, not only their shapes, decide)."""
    if timed:
      for i, m in self.batches:
        fn(i, m)
    start = time.perf_counter()
    outs = [fn(i, m) for i, m in self.batches]
    return outs, (time.perf_counter() - start if timed else None)

  def texts(self, outs) -> list[str]:
    eos = self.pipeline.tokenizer.eos_id
    return [
      eval_lib.hypothesis_text(self.pipeline, o.tokens[r], int(o.lengths[r]), eos)
      for o in outs
      for r in range(len(o.lengths))
    ]


def _check_vocab(llm, slm, name: str, entry: str, tokenizer_size: int) -> None:
  try:  # sizes apart by more than padding: another tokenizer, even if both cover ours
    common_vocab([llm, slm], names=["the LLM (collab)", name])
    common_vocab([llm, slm], tokenizer_size, names=["the LLM (collab)", name])
  except ValueError as e:
    raise ValueError(f"study SLM {name} ({entry}) cannot decode with the LLM: {e}") from e


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the study `config` describes, writing into `workdir`; returns the report."""
  pipeline, mesh = assemble.for_study(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    return _study(config, workdir, pipeline, mesh)


def _study(config, workdir, pipeline, mesh) -> dict:
  s, d, co = config.study, config.decode, config.collab
  primary = metrics.PRIMARY[config.data.task_type]
  eos, vocab = pipeline.tokenizer.eos_id, pipeline.vocab_size
  quality = lambda texts, refs: metrics.scores_for_task(config.data.task_type, texts, refs)[primary]
  n = d.max_examples or len(pipeline.source(d.split))
  prompts = _Prompts(pipeline, d.split, n, d.batch_size)
  common = dict(
    max_new_tokens=d.max_new_tokens,
    eos_id=eos,
    tokenizer_size=vocab,
    prompt_buckets=config.data.prompt_buckets or None,
  )

  # Models: the LLM, the listed SLMs, the trained ones.
  llm_entry = next(f"{f}:{co[f]}" for f in ("workdir", "path", "preset") if co[f])
  llm, llm_p = assemble.load_source(config, co, "collab", pipeline, mesh)
  n_llm = _decoding_params(llm, llm_p)
  entries = [
    (name, f"{kind}:{value}", assemble.source_group(kind, value))
    for name, kind, value in config_study.study_slms(config)
  ]
  trained = train_slms(config, workdir)
  entries += [
    (name, f"workdir:{path}", assemble.source_group("workdir", path))
    for name, path in trained.items()
  ]
  slms = {}
  for name, entry, group in entries:
    model, params = assemble.load_source(config, group, f"study.slms {name}", pipeline, mesh)
    _check_vocab(llm, model, name, entry, vocab)
    slms[name] = (model, params, entry)

  def gen(model, params):
    return lambda i, m: decode(
      Sample(), model, params, i, m, extra_inputs=adapter_for(model).partner_inputs(i, m), **common
    )

  llm_outs, llm_seconds = prompts.run(gen(llm, llm_p), timed=True)
  llm_quality = quality(prompts.texts(llm_outs), prompts.refs)
  report = {
    "llm": {"source": llm_entry, "params": n_llm, "quality": llm_quality, "seconds": llm_seconds},
    "metric": primary,
    "task_type": config.data.task_type,
    "split": d.split,
    "examples": len(prompts.refs),
    "batch_size": d.batch_size,
    "max_new_tokens": d.max_new_tokens,
    "pairs": {},
  }

  def pair(spec, model, params):
    """Decodes a batch with (the LLM, `model`); a hybrid reads the prompt ids too."""
    return lambda i, m: decode(
      spec,
      (llm, model),
      (llm_p, params),
      i,
      m,
      extra_inputs=[adapter_for(x).partner_inputs(i, m) for x in (llm, model)],
      **common,
    )

  oracle_spec = Combined(Router("always"))

  def oracle(model, params, batches):
    return [pair(oracle_spec, model, params)(i, m) for i, m in batches]

  for name, (model, params, entry) in slms.items():
    logging.info("study: oracle run of %s", name)
    outs = oracle(model, params, prompts.batches)
    alone, seconds = prompts.run(gen(model, params), timed=True)
    events = np.concatenate(
      [_pad(o.tokens != o.trace["small_choice"], d.max_new_tokens) for o in outs]
    )
    lengths = np.concatenate([o.lengths for o in outs])
    n_slm = _decoding_params(model, params)
    report["pairs"][name] = {
      "source": entry,
      "trained_here": name in trained,
      "params": n_slm,
      "ratio": n_llm / n_slm,
      **summarize(oracle_spec, outs),
      "quality_oracle": quality(prompts.texts(outs), prompts.refs),
      "quality_slm": quality(prompts.texts(alone), prompts.refs),
      "seconds_slm": seconds,
      "positions": analysis.position_histogram(events, lengths, bins=s.bins),
    }
    jax.clear_caches()

  # The router sweep, with speculative decoding beside it.
  sweep_on = list(s.sweep_on) or (
    [n for n, _, _ in config_study.study_slms(config)] or [f"slm_d{max(s.widths)}"]
  )
  routers = [
    (kind, t, Router(kind, float(t), margin_form=co.router_margin))
    for kind in ("top1", "margin", "entropy")
    for t in s[kind]
  ]
  sweep, report["svm_router"] = [], {}
  for name in sweep_on:
    model, params, _ = slms[name]
    svm = _svm(config, workdir, name, model, params, oracle, pipeline, svm_router)
    report["svm_router"][name] = svm["report"]
    these = routers + ([("svm", 0.0, Router("svm", svm=svm["router"]))] if svm["router"] else [])
    for kind, t, router in these:
      logging.info("study: routed decoding with %s, router %s %s", name, kind, t)
      spec = Routed(router, co.router_chunk)
      outs, seconds = prompts.run(pair(spec, model, params), timed=True)
      sweep.append(
        {
          "slm": name,
          "router": kind,
          "threshold": t,
          **summarize(spec, outs),
          "quality": quality(prompts.texts(outs), prompts.refs),
          "seconds": seconds,
          "speedup": llm_seconds / seconds,
        }
      )
      # Each router is its own compiled program; dozens of them kept alive exhaust XLA:CPU's
      # memory maps (vm.max_map_count), so drop them once measured.
      jax.clear_caches()
    spec = Speculative(co.gamma)
    outs, seconds = prompts.run(pair(spec, model, params), timed=True)
    sweep.append(
      {
        "slm": name,
        "router": "speculative",
        "threshold": float(co.gamma),
        "quality": quality(prompts.texts(outs), prompts.refs),
        "seconds": seconds,
        "speedup": llm_seconds / seconds,
        # passes of the LLM per token (it verifies several at once)
        "large_call_rate": summarize(spec, outs)["large_call_rate"],
      }
    )
  report["sweep"] = sweep
  report["scaling_law"] = _fit(report["pairs"], s.fit_on)
  _plots(report, workdir, analysis)
  files.write_json(os.path.join(workdir, "study.json"), report, indent=2)
  return report


def _pad(a: np.ndarray, width: int) -> np.ndarray:
  return np.pad(a, ((0, 0), (0, width - a.shape[1])))


def _svm(config, workdir, name, model, params, oracle, pipeline, svm_router) -> dict:
  """FS-GEN's SVM router for SLM `name`: {"router": SvmRouter | None, "report": {...}}."""
  s = config.study
  if not s.svm:
    return {"router": None, "report": {"error": "study.svm is empty: no SVM router"}}
  if s.svm != "train":
    router = svm_router.load(s.svm, k=s.svm_k)
    return {"router": router, "report": {"file": s.svm, "k": router.k}}
  fit_prompts = _Prompts(pipeline, s.svm_split, s.svm_examples, config.decode.batch_size)
  outs = oracle(model, params, fit_prompts.batches)
  x = np.concatenate([o.trace["small_top"][o.valid()][:, : s.svm_k] for o in outs])
  y = np.concatenate([(o.tokens != o.trace["small_choice"])[o.valid()] for o in outs])
  if y.all() or not y.any():
    return {
      "router": None,
      "report": {
        "error": f"the oracle run on {s.svm_split} has one class of labels only "
        f"({int(y.sum())} of {len(y)} tokens differ): no SVM fitted"
      },
    }
  router = svm_router.fit(x, y, kernel=s.svm_kernel)
  path = os.path.join(workdir, f"svm_router_{name}.json")
  svm_router.save(router, path)
  return {
    "router": router,
    "report": {
      "file": path,
      "k": router.k,
      "kernel": s.svm_kernel,
      "split": s.svm_split,
      "prompts": len(fit_prompts.refs),
      "tokens": int(len(y)),
      "positives": int(y.sum()),
    },
  }


def _fit(pairs: dict, fit_on: str) -> dict:
  chosen = {n: p for n, p in pairs.items() if fit_on == "all" or p["trained_here"]}
  chosen = sorted(chosen.items(), key=lambda kv: kv[1]["ratio"])
  if len(chosen) < 3:
    return {
      "error": f"{len(chosen)} model pair(s) with study.fit_on={fit_on!r}: the law "
      "y = b - a x^-alpha has three parameters and needs >= 3 pairs (not "
      "fitted)",
      "pairs": [n for n, _ in chosen],
    }
  try:
    fit = analysis.fit_with_holdout(
      [p["ratio"] for _, p in chosen], [p["collaboration_frequency"] for _, p in chosen]
    )
  except RuntimeError as e:  # curve_fit did not converge in maxfev
    return {"error": str(e), "pairs": [n for n, _ in chosen]}
  return {**fit, "pairs": [n for n, _ in chosen]}


def _plots(report: dict, workdir: str, analysis) -> None:
  analysis.plot_positions(
    {n: p["positions"] for n, p in report["pairs"].items()},
    os.path.join(workdir, "positions.png"),
    "Where the LLM changes the SLM's greedy token",
  )
  for name in sorted({r["slm"] for r in report["sweep"]}):
    rows = [r for r in report["sweep"] if r["slm"] == name]
    analysis.plot_sweep(
      rows,
      os.path.join(workdir, f"sweep_{name}.png"),
      f"{name}: {report['metric']} vs LLM calls and time",
      metric=report["metric"],
      llm=report["llm"],
    )
  law = report["scaling_law"]
  scaling = os.path.join(workdir, "scaling.png")
  if law.get("is_law"):
    analysis.plot_scaling(law, scaling, "Collaboration frequency vs size ratio")
  elif os.path.exists(scaling):
    os.remove(scaling)  # from an earlier run: it would not be this law


def summary(report: dict) -> str:
  m = report["metric"]
  lines = [
    f"LLM: {report['llm']['params']:,} params, {m} {report['llm']['quality']:.2f}, "
    f"{report['llm']['seconds']:.2f} s; {report['examples']} prompts of "
    f"{report['split']} in batches of {report['batch_size']}",
    f"pair         | SLM params | ratio | collab. freq. | {m} SLM | {m} oracle",
  ]
  for name, p in sorted(report["pairs"].items(), key=lambda kv: kv[1]["ratio"]):
    lines.append(
      f"{name:<12} | {p['params']:>10,} | {p['ratio']:5.1f} | "
      f"{100 * p['collaboration_frequency']:12.1f}% | {p['quality_slm']:8.2f} | "
      f"{p['quality_oracle']:8.2f}"
    )
    lines.append(
      "  LLM changes by output bin (%): "
      + " ".join(f"{100 * r:.0f}" for r in p["positions"]["rate"])
    )
  lines.append(f"router sweep      | threshold | call rate row/batch | {m} | seconds | speedup")
  for r in report["sweep"]:
    rates = (
      f"{100 * r['large_call_rate']:5.1f}% / {100 * r['batch_call_rate']:5.1f}%"
      if r["router"] != "speculative"
      else "   (lossless)    "
    )
    lines.append(
      f"{r['slm'] + ' ' + r['router']:<17} | {r['threshold']:9.3g} | {rates} | "
      f"{r['quality']:6.2f} | {r['seconds']:7.2f} | {r['speedup']:6.2f}x"
    )
  law = report["scaling_law"]
  if "a" in law:
    lines.append(
      f"scaling law over {', '.join(law['pairs'])}: y = {law['b']:.3f} - "
      f"{law['a']:.3f} x^-{law['alpha']:.3f} (R^2 {law['r2']:.3f})"
      + ("" if law["is_law"] else f"; NOT a law: {', '.join(law['at_bounds'])} on the lower bound")
    )
    if "holdout" in law:
      h = law["holdout"]
      lines.append(
        f"  held out ratio {h['ratio']:.1f}: measured {h['measured']:.3f}, "
        f"predicted {h['predicted']:.3f} (error {h['error']:+.3f})"
      )
  else:
    lines.append(f"scaling law: {law['error']}")
  return "\n".join(lines)
