"""The default job: a complete LLM-to-SLM experiment, offline, in minutes.

1. trains the "LLM" (a small T5 encoder-decoder) on the synthetic translation
   task, or reuses it if the workdir already holds it, and writes it as a
   transformers checkpoint (the hybrid loads its frozen encoder from there);
2. trains LLM-to-SLM (frozen LLM encoder + projector + an SLM ~10x smaller)
   and, as the baseline, the same SLM alone with the same budget;
3. evaluates all three with the eval library (greedy, batched and one prompt
   at a time) and prints one table, also written as JSON and as a PNG plot
   of quality against speed.

The table is read back from the three eval JSON files, never recomputed. The
systems are the configs of `l2s_jax/configs/demo.py`; each one lives in
ROOT/<which>, and a hybrid reads its LLM from ROOT/<its llm>/transformers.
The command is `python -m l2s_jax.demo` (l2s_jax/demo.py).
"""

from __future__ import annotations

import json
import logging
import os
import re

from l2s_jax import assemble, eval_lib, files, train_lib
from l2s_jax.configs import demo as demo_configs

SYSTEMS = ("llm", "slm", "hybrid")
LABELS = {"llm": "LLM (T5 enc-dec)", "slm": "SLM alone", "hybrid": "LLM-to-SLM"}


HYBRID_LLM = {"hybrid": "llm", "hybrid_wide": "llm_wide"}  # the LLM each hybrid reads


def system_config(which: str, root: str | None = None, *, test_budget: bool = False):
  """configs/demo.py:<which>, optionally shrunk for the end-to-end test; with `root`, a
  hybrid's LLM is the one trained and exported in ROOT/<its llm>/transformers."""
  c = demo_configs.get_config(which)
  if root is not None and which in HYBRID_LLM:
    c.llm.path = os.path.join(root, HYBRID_LLM[which], "transformers")
  if test_budget:
    c.train.steps = 4
    c.train.checkpoint_every = 4
    c.train.log_every = 2
    c.data.synthetic.num_validation = 12
    c.decode.batch_size = 8
    c.decode.batch1_examples = 2
    c.decode.max_new_tokens = 8
  return c


def _done(workdir: str, split: str) -> str | None:
  """The newest greedy eval JSON of a finished run, if any."""
  eval_dir = os.path.join(workdir, "eval")
  if not os.path.isdir(eval_dir):
    return None
  pattern = re.compile(re.escape(split) + r"-(\d+)\.json$")
  found = sorted((int(m.group(1)), f) for f in os.listdir(eval_dir) if (m := pattern.match(f)))
  return os.path.join(eval_dir, found[-1][1]) if found else None


EXPORTABLE = ("llm", "slm", "llm_wide", "llm_grown")  # the plain models of configs/demo.py


def export_system(root: str, which: str, *, test_budget: bool = False) -> str:
  """Writes the trained plain model ROOT/<which> (llm, slm, llm_wide, llm_grown) as
  ROOT/<which>/transformers, with its tokenizer; returns the path."""
  if which not in EXPORTABLE:
    raise ValueError(f"export: which={which!r}; the plain models are {EXPORTABLE}")
  workdir = os.path.join(root, which)
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(
      f"{workdir}: no checkpoints to export; train configs/demo.py:{which} there first"
    )
  return assemble.export_plain(system_config(which, root, test_budget=test_budget), workdir)


def load_system(root: str, which: str = "hybrid"):
  """(model, params) of a trained system ROOT/<which>, as its evaluation loads it: a
  hybrid's frozen encoder from the exported LLM, the rest from the latest checkpoint."""
  if which not in SYSTEMS + tuple(HYBRID_LLM) + EXPORTABLE:
    raise ValueError(f"load_system: which={which!r}; use one of configs/demo.py's systems")
  c = system_config(which, root)
  if which in HYBRID_LLM and not os.path.isfile(os.path.join(c.llm.path, "config.json")):
    how = (
      f"python -m l2s_jax.demo --workdir {root}"
      if which == "hybrid"
      else "the llm_wide commands in configs/demo.py"
    )
    raise FileNotFoundError(f"{c.llm.path}: no exported LLM; run {how} first")
  return assemble.load_trained(c, os.path.join(root, which))


def run_system(which: str, root: str, *, test_budget: bool) -> str:
  """Trains (unless done) and evaluates one system; returns its eval JSON path."""
  c = system_config(which, root, test_budget=test_budget)
  workdir = os.path.join(root, which)
  existing = _done(workdir, c.decode.split)
  if existing and json.load(open(existing))["step"] == c.train.steps:
    logging.info("%s: reusing %s", which, existing)
    return existing
  logging.info("%s: training for %d steps in %s", which, c.train.steps, workdir)
  train_lib.train_and_evaluate(c, workdir)
  report = eval_lib.evaluate(c, workdir)
  return os.path.join(workdir, "eval", f"{c.decode.split}-{report['step']}.json")


def build_table(eval_files: dict[str, str]) -> dict:
  """The results table, read from the systems' eval JSON files."""
  reports = {k: json.load(open(v)) for k, v in eval_files.items()}
  llm = reports["llm"]["speed"]
  rows = []
  for which in SYSTEMS:
    r = reports[which]
    sp = r["speed"]
    row = {
      "system": which,
      "label": LABELS[which],
      "eval_file": eval_files[which],
      "bleu": r["metrics"]["bleu"],
      "chrf": r["metrics"]["chrf"],
      "tokens_per_s_batched": sp["batched"]["generated_tokens_per_s"],
      "latency_per_example_batched_s": sp["batched"]["latency_per_example_s"],
      "tokens_per_s_batch1": sp["batch_1"]["generated_tokens_per_s"],
      "latency_per_example_batch1_s": sp["batch_1"]["latency_per_example_s"],
      "speedup_batch1": (
        llm["batch_1"]["latency_per_example_s"] / sp["batch_1"]["latency_per_example_s"]
      ),
      "speedup_batched": (
        llm["batched"]["latency_per_example_s"] / sp["batched"]["latency_per_example_s"]
      ),
    }
    rows.append(row)
  by = {r["system"]: r for r in rows}
  targets = {
    "hybrid_bleu_vs_llm": by["hybrid"]["bleu"] / max(by["llm"]["bleu"], 1e-9),
    "hybrid_bleu_minus_slm": by["hybrid"]["bleu"] - by["slm"]["bleu"],
    "hybrid_speedup_batch1": by["hybrid"]["speedup_batch1"],
  }
  targets["met"] = {
    "bleu_ratio>=0.95": targets["hybrid_bleu_vs_llm"] >= 0.95,
    "bleu_gain>=5": targets["hybrid_bleu_minus_slm"] >= 5.0,
    "speedup_batch1>=3": targets["hybrid_speedup_batch1"] >= 3.0,
  }
  return {
    "rows": rows,
    "targets": targets,
    "decode": reports["llm"]["decode"],
    "examples": reports["llm"]["examples"],
  }


def format_table(table: dict) -> str:
  cols = [
    ("label", "system", "{}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("tokens_per_s_batch1", "tok/s b=1", "{:.0f}"),
    ("latency_per_example_batch1_s", "ms/ex b=1", "{:.1f}"),
    ("tokens_per_s_batched", "tok/s batched", "{:.0f}"),
    ("latency_per_example_batched_s", "ms/ex batched", "{:.2f}"),
    ("speedup_batch1", "speedup b=1", "{:.2f}x"),
    ("speedup_batched", "speedup batched", "{:.2f}x"),
  ]

  def cell(row, key, fmt):
    v = row[key]
    return fmt.format(v * 1e3 if key.startswith("latency") else v)

  lines = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in table["rows"]]
  widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
  out = [" | ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
  out.insert(1, "-|-".join("-" * w for w in widths))
  t = table["targets"]
  out.append("")
  out.append(
    f"LLM-to-SLM BLEU / LLM BLEU = {t['hybrid_bleu_vs_llm']:.3f} (target >= 0.95); "
    f"LLM-to-SLM - SLM = {t['hybrid_bleu_minus_slm']:+.2f} BLEU (target >= +5); "
    f"speedup at batch 1 = {t['hybrid_speedup_batch1']:.2f}x (target >= 3x)"
  )
  return "\n".join(out)


def plot(table: dict, path: str) -> None:
  import matplotlib  # noqa: PLC0415 (heavy: only the plot needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend is set)

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in table["rows"]:
    ax.scatter(r["tokens_per_s_batch1"], r["bleu"], s=60)
    ax.annotate(
      r["label"], (r["tokens_per_s_batch1"], r["bleu"]), textcoords="offset points", xytext=(6, 4)
    )
  ax.set_xscale("log")
  ax.set_xlabel("generated tokens/s at batch 1 (log scale)")
  ax.set_ylabel("BLEU (synthetic task, validation)")
  ax.set_title("Quality vs speed")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_demo(workdir: str, *, test_budget: bool = False) -> dict:
  os.makedirs(workdir, exist_ok=True)
  evals = {"llm": run_system("llm", workdir, test_budget=test_budget)}
  export_system(workdir, "llm", test_budget=test_budget)
  evals["hybrid"] = run_system("hybrid", workdir, test_budget=test_budget)
  evals["slm"] = run_system("slm", workdir, test_budget=test_budget)
  table = build_table(evals)
  files.write_json(os.path.join(workdir, "results.json"), table, indent=2)
  plot(table, os.path.join(workdir, "quality_vs_speed.png"))
  text = format_table(table)
  files.write_text(os.path.join(workdir, "results.txt"), text + "\n")
  print(text)
  print(f"\nwritten: {workdir}/results.json, results.txt, quality_vs_speed.png")
  return table
