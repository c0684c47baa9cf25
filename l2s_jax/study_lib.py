"""Collaboration analyses of an LLM and SLMs trained on the same task (FS-GEN's study).

Reads the demo's trained LLM and SLM (`python -m l2s_jax.demo` first), trains
extra SLMs of other sizes for the scaling law (cached under ROOT/collab), and
writes to ROOT/collab:

  analysis.json            every number below
  positions.png            where in the output the LLM changes the SLM's token
  sweep.png                BLEU vs LLM-call rate as router thresholds move
  scaling.png              collaboration frequency vs N_LLM / N_SLM, with the fit
                           (drawn only when no parameter sits on its bound)
  svm_router.json          FS-GEN's SVM router, trained on the LLM-led run

The oracle runs consult the LLM at every step (collab/combine.py); the sweep
runs routed decoding, where the LLM runs only where a row's router fires
(collab/routed.py), and times it (after a compile run, all prompts in one
batch).
Every model is loaded through the assembly layer (`l2s_jax.assemble`). The
command is `python -m l2s_jax.collab.analyze`.
"""

from __future__ import annotations

import json
import logging
import os
import time

from l2s_jax import files

SWEEPS = {"top1": (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.01),
          "margin": (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.01),
          "entropy": (100.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.0)}


def _texts(pipeline, out) -> list[str]:
  from l2s_jax.eval_lib import hypothesis_text
  eos = pipeline.tokenizer.eos_id
  return [hypothesis_text(pipeline, out.tokens[r], int(out.lengths[r]), eos)
          for r in range(len(out.lengths))]


def _slm_sized(width: int, steps: int):
  from l2s_jax.demo_lib import system_config
  c = system_config("slm")
  overrides = json.loads(c.slm.overrides)
  overrides.update(d_model=width, d_kv=max(width // overrides["num_heads"], 4), d_ff=4 * width)
  c.slm.overrides = json.dumps(overrides)
  c.train.steps = steps
  return c


def trained_slms(root: str, sizes, steps: int) -> dict[str, tuple]:
  """{name: (workdir, config)} of the demo's SLM and of extra sizes (trained when missing)."""
  from l2s_jax import train_lib
  from l2s_jax.demo_lib import system_config
  out = {"demo_slm": (os.path.join(root, "slm"), system_config("slm"))}
  for width in sizes:
    c = _slm_sized(width, steps)
    workdir = os.path.join(root, "collab", f"slm_d{width}")
    if not os.path.isfile(os.path.join(workdir, "train_summary.json")):
      logging.info("training an SLM of width %d for %d steps in %s", width, steps, workdir)
      train_lib.train_and_evaluate(c, workdir)
    out[f"slm_d{width}"] = (workdir, c)
  return out


def analyze(root: str, *, sizes=(16, 32, 64), steps: int = 600, examples: int = 100,
            max_new_tokens: int = 48, sweeps: dict | None = None) -> dict:
  """Runs every analysis on the demo's models in `root`; returns the report (also written)."""
  from l2s_jax import assemble, metrics
  from l2s_jax.collab import analysis, svm_router
  from l2s_jax.collab.combine import Router, collab_generate
  from l2s_jax.collab.routed import routed_generate
  from l2s_jax.demo_lib import load_system, system_config
  from l2s_jax.eval_lib import prompt_batch
  from l2s_jax.models import count_params
  llm_dir = os.path.join(root, "llm")
  if not os.path.isdir(os.path.join(llm_dir, "checkpoints")):
    raise FileNotFoundError(f"no trained LLM in {llm_dir}: run `python -m l2s_jax.demo "
                            f"--workdir {root}` first")
  out_dir = os.path.join(root, "collab")
  os.makedirs(out_dir, exist_ok=True)
  cfg = system_config("llm")
  pipeline = assemble.data_pipeline(cfg, llm_dir, batch_size=1, training=False)
  ids, mask, refs = prompt_batch(pipeline, "validation", examples)
  eos = pipeline.tokenizer.eos_id
  llm, llm_params = load_system(root, "llm")
  n_llm = count_params(llm_params)
  report = {"llm": {"path": llm_dir, "params": n_llm}, "examples": len(refs), "pairs": {}}

  def run(slm, slm_params, router):
    return collab_generate([llm, slm], [llm_params, slm_params], ids, mask, combiner=router,
                           max_new_tokens=max_new_tokens, eos_id=eos, prompt_buckets=None)

  def routed(slm, slm_params, router):
    """(output, seconds) of routed decoding, timed after a first (compiling) run."""
    call = lambda: routed_generate([llm, slm], [llm_params, slm_params], ids, mask,
                                   router=router, max_new_tokens=max_new_tokens, eos_id=eos,
                                   prompt_buckets=None)
    call()
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start

  def bleu(out):
    return metrics.translation_scores(_texts(pipeline, out), refs)["bleu"]

  slms, oracles = {}, {}
  for name, (path, c) in trained_slms(root, sizes, steps).items():
    slm, slm_params = slms[name] = assemble.load_trained(c, path)
    always = oracles[name] = run(slm, slm_params, Router("always"))
    never = run(slm, slm_params, Router("never"))
    n_slm = count_params(slm_params)
    report["pairs"][name] = {
        "path": path, "params": n_slm, "ratio": n_llm / n_slm,
        "collaboration_frequency": always.collaboration_frequency,
        "bleu_llm": bleu(always), "bleu_slm": bleu(never),
        "positions": analysis.position_histogram(always.tokens != always.slm_choice,
                                                 always.lengths)}
  main = report["pairs"]["demo_slm"]
  slm, slm_params = slms["demo_slm"]
  routers = [(kind, t, Router(kind, t))
             for kind, thresholds in (SWEEPS if sweeps is None else sweeps).items()
             for t in thresholds]
  # FS-GEN's learned router: an SVM over the SLM's top-k probabilities along the LLM-led run,
  # labelled "the LLM's token differs from the SLM's".
  oracle = oracles["demo_slm"]
  valid = oracle.valid()
  labels = (oracle.tokens != oracle.slm_choice)[valid]
  if labels.any() and not labels.all():
    router = svm_router.fit(oracle.slm_top[valid], labels, kernel="rbf")
    svm_router.save(router, os.path.join(out_dir, "svm_router.json"))
    report["svm_router"] = {"file": os.path.join(out_dir, "svm_router.json"), "k": router.k,
                            "examples": int(valid.sum()), "positives": int(labels.sum())}
    routers.append(("svm", 0.0, Router("svm", svm=router)))
  else:
    report["svm_router"] = {"error": "the LLM-led run has one class of labels only "
                                     f"({int(labels.sum())} of {int(valid.sum())} differ)"}
  sweep = []
  for kind, t, router in routers:
    out, seconds = routed(slm, slm_params, router)
    sweep.append({"router": kind, "threshold": t, "call_rate": out.call_rate,
                  "batch_call_rate": out.batch_call_rate,
                  "llm_tokens_read": out.llm_tokens_read, "seconds": seconds,
                  "collaboration_frequency": out.collaboration_frequency, "bleu": bleu(out)})
  report["sweep"] = sweep
  analysis.plot_positions(main["positions"], os.path.join(out_dir, "positions.png"),
                          "Where the LLM changes the SLM's greedy token")
  analysis.plot_sweep(sweep, os.path.join(out_dir, "sweep.png"), "Quality vs LLM calls")
  pairs = sorted(report["pairs"].values(), key=lambda p: p["ratio"])
  if len(pairs) >= 3:
    try:
      fit = analysis.fit_with_holdout([p["ratio"] for p in pairs],
                                      [p["collaboration_frequency"] for p in pairs])
    except RuntimeError as e:                  # curve_fit did not converge in maxfev
      report["scaling_law"] = {"error": str(e)}
    else:
      report["scaling_law"] = fit
      if fit["is_law"]:
        analysis.plot_scaling(fit, os.path.join(out_dir, "scaling.png"),
                              "Collaboration frequency vs size ratio")
  else:
    report["scaling_law"] = {"error": f"{len(pairs)} model pairs: the law's three parameters "
                                      "need >= 3 (not fitted)"}
  files.write_json(os.path.join(out_dir, "analysis.json"), report, indent=2)
  return report


def summary(report: dict) -> str:
  lines = [f"LLM: {report['llm']['params']:,} params; {report['examples']} validation prompts",
           "pair        | SLM params | ratio | collab. freq. | BLEU SLM | BLEU LLM"]
  for name, p in sorted(report["pairs"].items(), key=lambda kv: kv[1]["ratio"]):
    lines.append(f"{name:<11} | {p['params']:>10,} | {p['ratio']:5.1f} | "
                 f"{100 * p['collaboration_frequency']:12.1f}% | {p['bleu_slm']:8.2f} | "
                 f"{p['bleu_llm']:8.2f}")
  rate = report["pairs"]["demo_slm"]["positions"]["rate"]
  lines.append("LLM changes by output decile (%): " + " ".join(f"{100 * r:.0f}" for r in rate))
  if "a" in report.get("scaling_law", {}):
    f = report["scaling_law"]
    lines.append(f"scaling law: y = {f['b']:.3f} - {f['a']:.3f} x^-{f['alpha']:.3f} "
                 f"(R^2 {f['r2']:.3f})" + ("" if f["is_law"] else
                                          f"; NOT a law: {', '.join(f['at_bounds'])} on the "
                                          "lower bound"))
  return "\n".join(lines)
