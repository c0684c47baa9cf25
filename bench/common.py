"""Shared helpers of the benchmark scripts: timing, machine facts, JSON output."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from l2s_jax import files


def preset_config(slm: str, llm: str | None = None, *, slm_path: str = "", dtype: str = "float32"):
  """A config for `l2s_jax.assemble.initial`: the preset `slm` (random weights) or the
  transformers directory `slm_path` alone (model.kind plain), or LLM-to-SLM on the preset
  `llm`'s encoder; every weight stored and computed in `dtype`."""
  from l2s_jax.config_schema import base_config

  c = base_config()
  c.model.kind = "hybrid" if llm else "plain"
  c.slm.preset, c.slm.path = slm, slm_path
  if llm:
    c.llm.preset = llm
  c.slm.dtype = c.llm.dtype = c.train.compute_dtype = dtype
  return c


def machine() -> dict:
  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()][:1],
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d"),
  }


def torch_device() -> str:
  """Where the transformers baselines run: CUDA when JAX runs on a GPU and PyTorch sees one
  (bench/gpu.sh), else the CPU."""
  import torch

  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(result):
  """`result` after PyTorch's queued GPU work has finished (a no-op on the CPU)."""
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()
  return result


def timed(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Runs the systems A B A B ... `repeats` times; the median seconds of each."""
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timed(fn))
  return {k: statistics.median(v) for k, v in times.items()}


def bandwidth_probe(gib: float = 1.0) -> tuple[Callable[[], object], int]:
  """(a jitted full read of a float32 array of `gib` GiB, its bytes): time it beside the
  systems (`alternate`) so that the bound is measured under the same load as they are."""
  n = int(gib * (1 << 30) // 4)
  x = jnp.ones((n,), jnp.float32)
  read = jax.jit(lambda a: jnp.sum(a))
  read(x).block_until_ready()
  return (lambda: read(x).block_until_ready()), n * 4


def token_agreement(a, b) -> tuple[int, int]:
  """(agreeing positions, positions) of two greedy outputs of the same prompts (`tokens` [B, N],
  `lengths` [B]): per row up to the shorter output, the length difference counted as
  disagreement."""
  agree = total = 0
  for r in range(a.tokens.shape[0]):
    la, lb = int(a.lengths[r]), int(b.lengths[r])
    n = min(la, lb)
    agree += int((np.asarray(a.tokens[r, :n]) == np.asarray(b.tokens[r, :n])).sum())
    total += max(la, lb)
  return agree, total


def demo_validation(workdir: str, examples: int):
  """(pipeline, ids, mask, references) of the first validation prompts of the demo's task
  (`python -m l2s_jax.demo --workdir WORKDIR` first)."""
  from l2s_jax import assemble, demo_lib
  from l2s_jax.eval_lib import prompt_batch

  pipeline = assemble.data_pipeline(
    demo_lib.system_config("llm"), os.path.join(workdir, "llm"), batch_size=1, training=False
  )
  return (pipeline, *prompt_batch(pipeline, "validation", examples))


def demo_greedy(config, model, params, ids, mask, eos: int):
  """Greedy output of a demo system with its config's decoding settings (a hybrid's LLM
  encoder reads the same prompt ids: one tokenizer)."""
  from l2s_jax.decoding import generate
  from l2s_jax.models.adapters import adapter_for

  return generate(
    model,
    params,
    ids,
    mask,
    max_new_tokens=config.decode.max_new_tokens,
    eos_id=eos,
    prompt_buckets=config.data.prompt_buckets,
    extra_inputs=adapter_for(model).partner_inputs(ids, mask),
  )


def bleu(pipeline, out, references) -> float:
  """sacrebleu BLEU of a greedy output's rows against the references."""
  from l2s_jax import metrics
  from l2s_jax.eval_lib import hypothesis_text

  eos = pipeline.tokenizer.eos_id
  hyps = [
    hypothesis_text(pipeline, out.tokens[r], int(out.lengths[r]), eos)
    for r in range(len(references))
  ]
  return metrics.translation_scores(hyps, references)["bleu"]


def write_json(path: str | None, payload: dict) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_json(
    path,
    payload,
    indent=2,  # atomic: no half-written result file
    default=lambda o: o.item() if isinstance(o, np.generic) else str(o),
  )


def table(rows: list[dict], columns: list[str]) -> str:
  widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
  line = " | ".join(c.ljust(widths[c]) for c in columns)
  sep = "-|-".join("-" * widths[c] for c in columns)
  body = "\n".join(" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows)
  return f"{line}\n{sep}\n{body}"


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return "" if v is None else str(v)
