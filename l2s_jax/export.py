"""Deployable artifacts: params, a transformers directory, a serialized generate function.

Every export is assembled in a temporary sibling directory and renamed into
place only when complete; its `manifest.json` (written last) lists the
config, the source checkpoint step, the arrays' shapes and dtypes, and the
size and SHA-256 of every file. Loaders verify all of it first, so a
truncated, altered or half-written export is refused with a clear error.

  params        trainable params (SLM + projector, or a plain model) with orbax
  transformers  the SLM alone as a `save_pretrained` directory (l2s_jax.hf.save)
  stablehlo     `jax.export` of the compiled generate for one batch/length
                signature, with the params it runs on
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from l2s_jax import files, hf
from l2s_jax.checkpoint import check_shapes, saved_shapes
from l2s_jax.decoding.front import decode_core
from l2s_jax.decoding.loop import Sample
from l2s_jax.decoding.request import cache_length, model_vocab_size
from l2s_jax.decoding.spec import Inputs

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ExportError(ValueError):
  """An export directory that is missing, incomplete or corrupt."""


def _tree_summary(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    jax.tree_util.keystr(k): {
      "shape": list(np.shape(v)),
      "dtype": np.dtype(getattr(v, "dtype", None) or np.asarray(v).dtype).name,
    }
    for k, v in flat
  }


def write_export(
  out_dir: str,
  kind: str,
  write: Callable[[str], dict],
  *,
  config=None,
  step: int | None = None,
  overwrite: bool = False,
) -> dict:
  """Runs write(tmp_dir) -> extra manifest fields, then publishes tmp_dir as out_dir."""
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(out_dir) and not overwrite:
    raise ExportError(f"{out_dir!r} already exists; pass overwrite=True to replace it")
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    extra = write(tmp) or {}
    manifest = {
      "format_version": FORMAT_VERSION,
      "kind": kind,
      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "source_step": step,
      "config": None if config is None else json.loads(config.to_json_best_effort()),
      **extra,
      "files": files.inventory(tmp, skip=(MANIFEST,)),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.rmdir(old)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
    return manifest
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def verify_export(path: str, kind: str | None = None) -> dict:
  """The manifest of a complete, unaltered export (else ExportError)."""
  if not os.path.isdir(path):
    raise ExportError(f"export directory {path!r} does not exist")
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise ExportError(f"{path!r} has no {MANIFEST}: not an export, or an incomplete one")
  try:
    with open(mpath, encoding="utf-8") as f:
      manifest = json.load(f)
    listed = manifest["files"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ExportError(f"{mpath!r} is not a valid export manifest: {e}") from e
  if kind is not None and manifest.get("kind") != kind:
    raise ExportError(f"{path!r} is a {manifest.get('kind')!r} export, not {kind!r}")
  problem = files.check_inventory(path, listed)
  if problem:
    raise ExportError(f"export {path!r}: {problem}")
  extra = sorted(set(files.inventory(path, skip=(MANIFEST,))) - set(listed))
  if extra:
    raise ExportError(f"export {path!r} holds files the manifest does not list: {extra[:5]}")
  return manifest


# --- params ------------------------------------------------------------------------------


def _save_params(params, directory: str) -> None:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), jax.device_get(params))
  ckptr.wait_until_finished()


def _restore_params(directory: str, abstract=None):
  """The saved params; into `abstract`'s shapes and shardings when given (checked first)."""
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, "params")
  if abstract is None:
    return ckptr.restore(path)
  check_shapes(saved_shapes(ckptr.metadata(path)), abstract, f"export {directory}")
  return ckptr.restore(path, abstract)


def _copy_tokenizers(tokenizers: dict[str, str] | None, tmp: str) -> list[str]:
  """Copies {name: tokenizer directory} into tmp/<name>; returns the names."""
  for name, source in (tokenizers or {}).items():
    if not os.path.isdir(source):
      raise ExportError(f"tokenizer directory {source!r} ({name}) does not exist")
    shutil.copytree(
      source, os.path.join(tmp, name), ignore=shutil.ignore_patterns(".tokenizer.tmp-*")
    )
  return sorted(tokenizers or {})


def export_params(
  params,
  out_dir: str,
  *,
  config=None,
  step: int | None = None,
  overwrite: bool = False,
  tokenizers: dict[str, str] | None = None,
) -> dict:
  """Trainable params (no optimizer state) for `eval.py` and `generate`; `tokenizers`
  ({"tokenizer": dir, "llm_tokenizer": dir}) travel beside them as subdirectories."""

  def write(tmp):
    _save_params(params, tmp)
    return {"params": _tree_summary(params), "tokenizers": _copy_tokenizers(tokenizers, tmp)}

  return write_export(out_dir, "params", write, config=config, step=step, overwrite=overwrite)


def load_params(path: str, abstract=None):
  """(manifest, params) of a verified params export; `abstract` (ShapeDtypeStructs, with
  shardings) says where they go and which shapes the model expects."""
  manifest = verify_export(path, "params")
  return manifest, _restore_params(path, abstract)


# --- transformers --------------------------------------------------------------------------


def export_transformers(
  model,
  params,
  out_dir: str,
  *,
  config=None,
  step: int | None = None,
  overwrite: bool = False,
  tokenizer: str | None = None,
) -> dict:
  """A plain model (T5, GPT-2, Llama/Qwen2 families) as a transformers directory,
  `out_dir`/model, with the files of its `tokenizer` directory beside the weights (one
  directory for `from_pretrained` and `AutoTokenizer`)."""

  def write(tmp):
    target = os.path.join(tmp, "model")
    if tokenizer is not None:
      if not os.path.isdir(tokenizer):
        raise ExportError(f"tokenizer directory {tokenizer!r} does not exist")
      shutil.copytree(tokenizer, target, ignore=shutil.ignore_patterns(".tokenizer.tmp-*"))
    hf.save(model, params, target)
    return {
      "params": _tree_summary(params),
      "model_class": type(model).__name__,
      "tokenizer": tokenizer is not None,
    }

  return write_export(out_dir, "transformers", write, config=config, step=step, overwrite=overwrite)


def load_transformers(path: str, dtype: str = "float32"):
  """(manifest, model, params) of a verified transformers export."""
  manifest = verify_export(path, "transformers")
  model, params = hf.load(os.path.join(path, "model"), dtype=dtype)
  return manifest, model, params


# --- serialized generate --------------------------------------------------------------------


def _generate_fn(model, *, max_new_tokens: int, cache_len: int, eos_ids: tuple, pad_id: int):
  """Greedy decoding through the decoding front's traceable core, stop and pad ids fixed."""
  core = functools.partial(
    decode_core,
    spec=Sample(),
    models=(model,),
    max_new_tokens=max_new_tokens,
    vocab=model_vocab_size(model),
  )

  def fn(params, input_ids, attention_mask, extra_inputs):
    stops = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    inputs = Inputs(
      input_ids,
      attention_mask,
      (extra_inputs,),
      stops,
      jnp.asarray(pad_id, jnp.int32),
      (cache_len,),
    )
    out = core((params,), inputs, jax.random.PRNGKey(0), ())
    return out["tokens"], out["lengths"]

  return fn


def export_generate(
  model,
  params,
  out_dir: str,
  *,
  batch: int,
  prompt_len: int,
  max_new_tokens: int,
  eos_id: int | None,
  pad_id: int = 0,
  extra_shapes: dict[str, tuple[tuple[int, ...], Any]] | None = None,
  config=None,
  step: int | None = None,
  overwrite: bool = False,
) -> dict:
  """Serializes greedy generation for prompts [batch, prompt_len] with `jax.export`.

  extra_shapes: shapes and dtypes of the model's extra prefill inputs, e.g.
  the hybrid's {"llm_input_ids": ((B, M), int32), "llm_attention_mask": ...}.
  The export takes right-padded prompts (as `prepare_prompts` makes them).
  """
  eos = () if eos_id is None else (int(eos_id),)
  cache_len = cache_length(model, prompt_len, max_new_tokens)
  fn = _generate_fn(
    model, max_new_tokens=max_new_tokens, cache_len=cache_len, eos_ids=eos, pad_id=pad_id
  )
  i32 = np.int32
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  args = (
    jax.tree.map(lambda x: spec(np.shape(x), x.dtype), params),
    spec((batch, prompt_len), i32),
    spec((batch, prompt_len), i32),
    {k: spec(shape, dtype) for k, (shape, dtype) in (extra_shapes or {}).items()},
  )
  exported = jax.export.export(jax.jit(fn))(*args)
  blob = exported.serialize()

  def write(tmp):
    with open(os.path.join(tmp, "generate.stablehlo"), "wb") as f:
      f.write(blob)
    _save_params(params, tmp)
    return {
      "signature": {
        "batch": batch,
        "prompt_len": prompt_len,
        "max_new_tokens": max_new_tokens,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "extra_inputs": {
          k: [list(s), np.dtype(d).name] for k, (s, d) in (extra_shapes or {}).items()
        },
      },
      "platforms": list(exported.platforms),
      "params": _tree_summary(params),
    }

  return write_export(out_dir, "stablehlo", write, config=config, step=step, overwrite=overwrite)


def load_generate(path: str):
  """(manifest, run) where run(input_ids, attention_mask, **extra) -> (tokens, lengths)."""
  manifest = verify_export(path, "stablehlo")
  with open(os.path.join(path, "generate.stablehlo"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  params = _restore_params(path)
  sig = manifest["signature"]

  def run(input_ids, attention_mask, **extra):
    want = (sig["batch"], sig["prompt_len"])
    if np.shape(input_ids) != want:
      raise ValueError(f"this export takes prompts of shape {want}, got {np.shape(input_ids)}")
    missing = set(sig["extra_inputs"]) - set(extra)
    if missing:
      raise ValueError(f"this export needs the extra inputs {sorted(missing)}")
    extra = {k: np.asarray(v, np.dtype(sig["extra_inputs"][k][1])) for k, v in extra.items()}
    return exported.call(
      params, np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32), extra
    )

  return manifest, run
