"""The one place a run is put together from its config: data, model, params, placement.

Training, evaluation, the demo, the collaboration study and the benchmarks
all come through here; nothing else derives the model kind, reads a
checkpoint or decides where params live.

  run = for_training(config, workdir)     # initial params, placed on config.mesh
  run = for_evaluation(config, workdir)   # params per config.decode.params (checkpoint:
                                          # params alone, no optimizer), placed the same way
  run = initial(config)                   # the model as configured, no data (benchmarks)
  model, params = load_trained(config, workdir)   # a trained workdir, ready to decode
  path = export_plain(config, workdir)    # a trained plain model as a transformers directory

Placement follows one recipe for both: abstract params (`eval_shape`) ->
logical partition specs -> mesh shardings under `config.llm.rules` (the
frozen LLM) and `config.slm.rules` (projector and SLM) -> params initialised
into those shardings, or loaded / restored straight into them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from l2s_jax import (
  build,
  checkpoint,
  config_fingerprint,
  config_schema,
  config_study,
  export,
  hf,
  sharding,
)
from l2s_jax.checkpoint import TrainCheckpoints, abstract_like
from l2s_jax.collab import svm_router
from l2s_jax.data import Pipeline, build_pipeline
from l2s_jax.data.tokenize import load_tokenizer, same_tokenizer
from l2s_jax.models import ModelAdapter, T5, adapter_for, init_boxed

PARAM_SOURCES = "checkpoint | initial | export:DIR"


def slm_kind(config: ml_collections.ConfigDict) -> str:
  """'encoder_decoder' or 'decoder_only': the SLM's family, from its checkpoint or preset."""
  if config.slm.path:
    kind = hf.io.read_config(config.slm.path).get("model_type")
    return "encoder_decoder" if kind in ("t5", "mt5") else "decoder_only"
  cls, _ = build.preset(config.slm.preset)
  return "encoder_decoder" if cls is T5 else "decoder_only"


def mesh_from_config(config: ml_collections.ConfigDict, devices=None):
  """`config.mesh` over all devices (of every process), or over `devices`."""
  try:
    return sharding.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from e


def data_pipeline(
  config: ml_collections.ConfigDict,
  workdir: str | None,
  *,
  batch_size: int,
  training: bool,
  mesh=None,
) -> Pipeline:
  """The configured task's data.

  training: `batch_size` is the global batch; each process loads its own
  rows of every batch (process-local data). Evaluation: every process reads
  the whole batch, as the decoders take it.
  """
  if training:
    dp = sharding.data_parallel_size(mesh) if mesh is not None else 1
    if batch_size % dp:
      raise ValueError(
        f"train.batch_size={batch_size} is not a multiple of the data-parallel "
        f"size {dp} (mesh {dict(mesh.shape)})"
      )
    if batch_size % jax.process_count():
      raise ValueError(
        f"train.batch_size={batch_size} is not a multiple of {jax.process_count()} processes"
      )
    return build_pipeline(
      config.data,
      model_kind=slm_kind(config),
      hybrid=config.model.kind == "hybrid",
      batch_size=batch_size // jax.process_count(),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      workdir=workdir,
      agree_lengths=_agree_lengths,
    )
  return build_pipeline(
    config.data,
    model_kind=slm_kind(config),
    hybrid=config.model.kind == "hybrid",
    batch_size=batch_size,
    workdir=workdir,
  )


def param_shardings(model: nn.Module, mesh, config: ml_collections.ConfigDict):
  """(trainable shardings, frozen shardings): the LLM under `llm.rules`, the rest under
  `slm.rules`."""
  adapter = adapter_for(model)
  trainable, frozen = adapter.split(
    jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0)))
  )
  frozen_sh = (
    sharding.logical_shardings(frozen, mesh, config.llm.rules) if adapter.is_hybrid else {}
  )
  return sharding.logical_shardings(trainable, mesh, config.slm.rules), frozen_sh


def abstract_trainable(model: nn.Module):
  """ShapeDtypeStructs of the trainable tree ({projector, slm}, or a plain model's)."""
  return trainable_part(
    model, nn.unbox(jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0))))
  )


def trainable_part(model: nn.Module, tree):
  """A model's tree without a hybrid's frozen LLM encoder ({projector, slm}); a plain model's
  whole tree (`adapter_for(model).split(tree)[0]`)."""
  return adapter_for(model).split(tree)[0]


@dataclasses.dataclass
class Assembly:
  """A run put together: every param already on its devices."""

  config: ml_collections.ConfigDict
  mesh: Any
  pipeline: Pipeline | None
  model: nn.Module  # params in their storage dtype
  frozen: Any  # the LLM encoder's params ({} for a plain model)
  trainable: Any  # {projector, slm}, or the plain model's
  frozen_shardings: Any
  trainable_shardings: Any
  step: int = 0  # the training step the trainable params come from

  @property
  def adapter(self) -> ModelAdapter:
    """The model kind's answers (`l2s_jax.models.adapters`)."""
    return adapter_for(self.model)

  @property
  def compute_model(self) -> nn.Module:
    """The model computing in `train.compute_dtype`."""
    return build.with_compute_dtype(self.model, self.config.train.compute_dtype)

  @property
  def train_model(self) -> nn.Module:
    """The model the train step differentiates: `compute_model`, each layer
    rematerialized when `train.remat` is set."""
    model = self.compute_model
    return build.with_remat(model) if self.config.train.remat else model

  @property
  def params(self):
    """The full tree `model.apply` takes."""
    return self.adapter.merge(self.trainable, self.frozen)


def check_processes_agree(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a multi-host job whose processes were given different configs or workdirs.

  Every process compares its own with process 0's and names the fields that
  differ; all processes raise together, none is left waiting in a collective.
  """
  mine = json.loads(json.dumps({"config": config.to_dict(), "workdir": workdir}, default=str))
  first = sharding.broadcast_json(mine)
  diffs = config_fingerprint.diff_fingerprints(first, mine, names=("process 0", "this process"))
  bad = sharding.any_process(bool(diffs))
  if bad.size:
    shown = "; ".join(diffs[:8]) if diffs else "this process agrees with process 0"
    raise ValueError(
      f"the processes of this multi-host job were given different configs: "
      f"process(es) {bad.tolist()} differ from process 0 (this is process "
      f"{jax.process_index()}: {shown})"
    )


def _agree_lengths(lengths: dict[str, int]) -> dict[str, int]:
  """The longest sequences over every process of a multi-host job (one collective)."""
  keys = sorted(lengths)
  return dict(zip(keys, (int(v) for v in sharding.agree_max([lengths[k] for k in keys]))))


def _start(config, workdir, mesh):
  config_schema.validate(config)
  sharding.maybe_initialize_distributed()
  check_processes_agree(config, workdir)
  return mesh if mesh is not None else mesh_from_config(config)


def initial(
  config: ml_collections.ConfigDict,
  mesh=None,
  *,
  vocab_size: int | None = None,
  llm_vocab_size: int | None = None,
) -> Assembly:
  """The model as configured, before training (presets initialised, `path`s loaded),
  placed on the mesh; no data (`pipeline` None). `vocab_size` / `llm_vocab_size`: the
  tokenizers' (the SLM's and the LLM's)."""
  mesh = mesh if mesh is not None else mesh_from_config(config)
  model = build.build_model(config, vocab_size=vocab_size, llm_vocab_size=llm_vocab_size)
  t_sh, f_sh = param_shardings(model, mesh, config)
  frozen, trainable = build.initial_params(config, model, shardings=(t_sh, f_sh))
  return _placed(config, mesh, model, frozen, trainable, (t_sh, f_sh))


def abstract(
  config: ml_collections.ConfigDict,
  mesh,
  *,
  vocab_size: int | None = None,
  llm_vocab_size: int | None = None,
) -> Assembly:
  """`initial`'s run known by its shapes alone: the params are ShapeDtypeStructs on the
  shardings `initial` would place them on (in each group's storage dtype; the projector's
  float32). Nothing is initialised or read, so the mesh may be a TPU slice this machine
  does not have (programs compiled ahead of time: `l2s_jax.compile_lib`)."""
  model = build.build_model(config, vocab_size=vocab_size, llm_vocab_size=llm_vocab_size)
  t_sh, f_sh = param_shardings(model, mesh, config)
  adapter = adapter_for(model)
  trainable, frozen = adapter.split(
    nn.unbox(jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0))))
  )
  if adapter.is_hybrid:
    frozen = _structs(frozen, f_sh, build.storage_dtype(config.llm))
    trainable = {
      "projector": _structs(trainable["projector"], t_sh["projector"], None),
      "slm": _structs(trainable["slm"], t_sh["slm"], build.storage_dtype(config.slm)),
    }
  else:
    trainable = _structs(trainable, t_sh, build.storage_dtype(config.slm))
  return Assembly(config, mesh, None, model, frozen, trainable, f_sh, t_sh, 0)


def _structs(tree, shardings, dtype):
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), tree, shardings
  )


def from_params(
  config: ml_collections.ConfigDict, model: nn.Module, *, frozen, trainable, mesh=None
) -> Assembly:
  """A model with params made elsewhere (tests, other programs), placed on `mesh` (default
  `config.mesh`) as `initial` places them; no data (`pipeline` None)."""
  mesh = mesh if mesh is not None else mesh_from_config(config)
  return _placed(config, mesh, model, frozen, trainable, param_shardings(model, mesh, config))


def _placed(config, mesh, model, frozen, trainable, shardings) -> Assembly:
  """An Assembly of params placed on their (trainable, frozen) shardings; no data."""
  t_sh, f_sh = shardings
  return Assembly(
    config,
    mesh,
    None,
    model,
    sharding.place(frozen, f_sh),
    sharding.place(trainable, t_sh),
    f_sh,
    t_sh,
    0,
  )


def for_training(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> Assembly:
  """Data (process-local), model, and the initial params placed on the mesh."""
  mesh = _start(config, workdir, mesh)
  pipeline = data_pipeline(
    config, workdir, batch_size=config.train.batch_size, training=True, mesh=mesh
  )
  return dataclasses.replace(
    initial(config, mesh, vocab_size=pipeline.vocab_size, llm_vocab_size=_llm_vocab(pipeline)),
    pipeline=pipeline,
  )


def _llm_vocab(pipeline) -> int | None:
  return pipeline.llm_tokenizer.vocab_size if pipeline.llm_tokenizer is not None else None


def for_evaluation(
  config: ml_collections.ConfigDict, workdir: str, mesh=None, *, batch_size: int | None = None
) -> Assembly:
  """Data (whole batches), model, the frozen LLM and the params `config.decode.params`
  names, all placed on the mesh by the training rules. No optimizer is built."""
  mesh = _start(config, workdir, mesh)
  if config.decode.params == "checkpoint":  # before anything is built or written
    _checkpoint_dir(workdir)
  batch_size = config.decode.batch_size if batch_size is None else batch_size
  dp = sharding.data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(
      f"decode.batch_size={batch_size} is not a multiple of the data-parallel "
      f"size {dp} (config.mesh {dict(mesh.shape)})"
    )
  pipeline = data_pipeline(config, workdir, batch_size=batch_size, training=False)
  run = _decoding_params(
    config, workdir, mesh, vocab_size=pipeline.vocab_size, llm_vocab_size=_llm_vocab(pipeline)
  )
  return dataclasses.replace(run, pipeline=pipeline)


def _decoding_params(
  config, workdir, mesh, *, vocab_size: int, llm_vocab_size: int | None
) -> Assembly:
  """The model for tokenizers of these sizes, the frozen LLM and the params
  `config.decode.params` names, placed on `mesh`; no data (`pipeline` None)."""
  model = build.build_model(config, vocab_size=vocab_size, llm_vocab_size=llm_vocab_size)
  t_sh, f_sh = param_shardings(model, mesh, config)
  frozen = {}
  if adapter_for(model).is_hybrid:
    frozen = sharding.place(
      build.group_params(
        config.llm, model.llm, rng=build.param_rngs(config)["llm"], shardings=f_sh
      ),
      f_sh,
    )
  step, trainable = trained_params(config, workdir, model, t_sh)
  return Assembly(config, mesh, None, model, frozen, trainable, f_sh, t_sh, step)


def trained_params(
  config: ml_collections.ConfigDict, workdir: str, model: nn.Module, shardings
) -> tuple[int, Any]:
  """(step, trainable params) by `config.decode.params`, placed on `shardings`."""
  source = config.decode.params
  abstract = abstract_like(abstract_trainable(model), shardings)
  if source == "checkpoint":
    return restore_params(
      workdir,
      abstract,
      step=config.decode.checkpoint_step or None,
      fallback=config.decode.checkpoint_fallback,
    )
  if source == "initial":
    _, trainable = build.initial_params(config, model, shardings=(shardings, None))
    return 0, sharding.place(trainable, shardings)
  if source.startswith("export:"):
    manifest, params = export.load_params(source[len("export:") :], abstract)
    return int(manifest.get("source_step") or 0), params
  raise ValueError(f"decode.params {source!r}: use {PARAM_SOURCES}")


def restore_params(
  workdir: str, abstract, step: int | None = None, fallback: bool = False
) -> tuple[int, Any]:
  """(step, trainable params) of a workdir's checkpoint (the latest, or `step`), restored
  alone into `abstract`'s shardings; shapes are checked against it first.

  A damaged or unreadable checkpoint is an error naming the step and what is wrong; with
  `fallback` the newest readable earlier step is used instead (and said).
  """
  _checkpoint_dir(workdir)
  ckpt = TrainCheckpoints(workdir, keep=1, async_save=False, create=False)
  try:
    steps = ckpt.manager.all_steps()
    if step is None:
      step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(
        f"no checkpoint in {ckpt.directory}; train first, or set "
        "decode.params='initial' to evaluate the model as configured"
      )
    if step not in steps:
      raise FileNotFoundError(
        f"no checkpoint of step {step} in {ckpt.directory} (steps there: {sorted(steps)})"
      )
    candidates = [s for s in sorted(steps, reverse=True) if s <= step] if fallback else [step]
    problems = []
    for s in candidates:
      params, problem = checkpoint.readable(ckpt, s, lambda s: ckpt.restore_params(s, abstract))
      if problem is None:
        if problems:
          logging.warning(
            "evaluating step %d, the newest readable checkpoint (%s)", s, "; ".join(problems)
          )
        return int(s), params
      problems.append(f"step {s}: {problem}")
    hint = (
      ""
      if fallback
      else "; set decode.checkpoint_fallback=True to evaluate the newest readable earlier step"
    )
    raise checkpoint.UnreadableCheckpoint(
      f"checkpoint unreadable in {ckpt.directory}: {'; '.join(problems)}{hint}"
    )
  finally:
    ckpt.close()


def _checkpoint_dir(workdir: str) -> str:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"no checkpoints in {directory}; train first, or set "
      "decode.params='initial' to evaluate the model as configured"
    )
  return directory


def load_trained(config: ml_collections.ConfigDict, workdir: str, mesh=None):
  """(model in its compute dtype, params) of a trained workdir, as its evaluation loads
  them: the frozen LLM from its own source, the rest from the latest checkpoint."""
  run = _trained(config, workdir, mesh)
  return run.compute_model, run.params


def _trained(config, workdir, mesh) -> Assembly:
  config = config.copy_and_resolve_references()
  config.decode.params = "checkpoint"
  mesh = mesh if mesh is not None else mesh_from_config(config)
  return for_evaluation(config, workdir, mesh, batch_size=sharding.data_parallel_size(mesh))


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with, from its latest checkpoint's fingerprint."""
  _checkpoint_dir(workdir)
  ckpt = TrainCheckpoints(workdir, keep=1, async_save=False, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint in {ckpt.directory}")
    fp = ckpt.read_meta(step).get("fingerprint")
  finally:
    ckpt.close()
  if not fp:
    raise ValueError(f"{workdir}: its checkpoint carries no config fingerprint")
  return config_fingerprint.from_fingerprint(fp)


def load_partner(
  config: ml_collections.ConfigDict, group: ml_collections.ConfigDict, name: str, run: Assembly
):
  """(model in the run's compute dtype, params on the run's mesh) of a model that decodes
  beside the configured one (`load_source` with the run's data and mesh)."""
  return load_source(config, group, name, run.pipeline, run.mesh)


def load_source(
  config: ml_collections.ConfigDict,
  group: ml_collections.ConfigDict,
  name: str,
  pipeline: Pipeline,
  mesh,
):
  """(model in `config`'s compute dtype, params on `mesh`) of a model group: a trained
  workdir (its own config, read from its checkpoint; it must share `pipeline`'s tokenizer),
  a transformers directory or a preset (placed by `group.rules`)."""
  if group.workdir:
    other = _partner_workdir(config, group.workdir, name, pipeline, mesh)
    return build.with_compute_dtype(other.model, config.train.compute_dtype), other.params
  module = build.group_module(group, name, vocab_size=pipeline.vocab_size)
  boxed = jax.eval_shape(lambda: init_boxed(module, jax.random.PRNGKey(0)))
  shardings = sharding.logical_shardings(boxed, mesh, group.rules)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), name_seed(name))  # apart from ours
  params = build.group_params(group, module, rng=rng, shardings=shardings)
  return (
    build.with_compute_dtype(module, config.train.compute_dtype),
    sharding.place(params, shardings),
  )


def abstract_partner(
  config: ml_collections.ConfigDict, group: ml_collections.ConfigDict, name: str, run: Assembly
):
  """`load_partner`'s (model in the compute dtype, params) known by shapes alone: params as
  ShapeDtypeStructs on `group.rules`' shardings over the run's mesh. A trained workdir's
  model comes from its own config (its checkpoint's), sized by the tokenizers it kept."""
  if group.workdir:
    other = config_from_workdir(group.workdir)
    sizes = kept_vocab_sizes(other, group.workdir)
    other_run = abstract(other, run.mesh, **sizes)
    return (
      build.with_compute_dtype(other_run.model, config.train.compute_dtype),
      other_run.params,
    )
  vocab = (
    run.pipeline.vocab_size
    if run.pipeline is not None
    else adapter_for(run.model).trained.config.vocab_size  # the configured model's
  )
  module = build.group_module(group, name, vocab_size=vocab)
  boxed = jax.eval_shape(lambda: init_boxed(module, jax.random.PRNGKey(0)))
  params = _structs(
    nn.unbox(boxed),
    sharding.logical_shardings(boxed, run.mesh, group.rules),
    build.storage_dtype(group),
  )
  return build.with_compute_dtype(module, config.train.compute_dtype), params


def kept_vocab_sizes(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{vocab_size, llm_vocab_size} of the tokenizers a trained workdir kept (`tokenizer_dirs`);
  a size is None where none is kept (the preset's own vocabulary is used)."""
  dirs = tokenizer_dirs(config, workdir)
  sizes = {}
  for field, key in (("tokenizer", "vocab_size"), ("llm_tokenizer", "llm_vocab_size")):
    spec = dirs.get(field) or (config.data[field] if config.data[field] == "byt5" else None)
    sizes[key] = load_tokenizer(spec).vocab_size if spec else None
  return sizes


def name_seed(name: str) -> int:
  """A stable 31-bit number of a group's name (its init key: every name its own)."""
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _partner_workdir(config, workdir: str, name: str, pipeline: Pipeline, mesh) -> Assembly:
  """A trained workdir's model and params (its own config, from its checkpoint; the latest
  step) on `mesh`, sized by the tokenizers it kept: no data pipeline of its own. Those
  tokenizers must be `pipeline`'s (a hybrid's LLM encoder reads our prompt ids too)."""
  other = config_from_workdir(workdir)
  other.decode.params = "checkpoint"
  config_schema.validate(other)
  hybrid = other.model.kind == "hybrid"
  tokenizer = _kept_tokenizer(other, workdir, "tokenizer", name)
  llm_tokenizer = None
  if hybrid:
    llm_tokenizer = (
      _kept_tokenizer(other, workdir, "llm_tokenizer", name)
      if other.data.llm_tokenizer
      else tokenizer
    )
  readers = [tokenizer] + ([llm_tokenizer] if hybrid else [])
  if not all(same_tokenizer(t, pipeline.tokenizer) for t in readers):
    raise ValueError(
      f"{name}.workdir {workdir!r} was trained with another tokenizer "
      f"({other.data.tokenizer!r}, LLM side "
      f"{other.data.llm_tokenizer or 'the same'!r}) than this config's "
      f"{config.data.tokenizer!r}: collaborating models share one tokenizer"
    )
  return _decoding_params(
    other,
    workdir,
    mesh,
    vocab_size=tokenizer.vocab_size,
    llm_vocab_size=llm_tokenizer.vocab_size if hybrid else None,
  )


def _kept_tokenizer(config, workdir: str, field: str, name: str):
  """The tokenizer of `config.data.<field>` a trained workdir reads (`tokenizer_dirs`)."""
  spec = config.data[field]
  directory = tokenizer_dirs(config, workdir).get(field)
  if directory is None and spec != "byt5":
    raise ValueError(
      f"{name}.workdir {workdir!r}: its data.{field} {spec!r} is neither kept "
      f"in it ({os.path.join(workdir, field)}) nor a directory"
    )
  return load_tokenizer(directory or spec)


def source_group(kind: str, value: str) -> ml_collections.ConfigDict:
  """A model group with one source set: kind workdir | path | preset."""
  group = config_schema.collab_group()
  for field in ("workdir", "path", "preset"):
    group[field] = value if field == kind else ""
  return group


def for_study(config: ml_collections.ConfigDict, workdir: str):
  """(pipeline, mesh) of a collaboration study (`config_study.study_config()`): its data,
  prepared for the recipe's SLM family, with a tokenizer kept in `workdir`."""
  config_study.validate_study(config)
  if config.study.svm not in ("", "train"):  # a router file: readable, of svm_k width
    svm_router.load(config.study.svm, k=config.study.svm_k)
  plain = config_study.recipe(config)
  mesh = mesh_from_config(plain)
  pipeline = data_pipeline(plain, workdir, batch_size=1, training=False)
  return pipeline, mesh


def export_plain(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes a trained plain model (the latest checkpoint) with its tokenizer as
  `workdir`/transformers, a directory transformers and `hf.load` read; returns the path.
  An existing complete export is kept."""
  out = os.path.join(os.path.abspath(workdir), "transformers")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  if config.model.kind != "plain":
    raise ValueError(
      "export_plain writes a plain model (model.kind='plain'); a hybrid's "
      "parts are exported with l2s_jax.export"
    )
  run = _trained(config, workdir, None)
  if jax.process_index() == 0:
    tmp = tempfile.mkdtemp(prefix=".transformers.tmp-", dir=os.path.dirname(out))
    try:
      tokenizer = os.path.join(workdir, "tokenizer")
      if os.path.isdir(tokenizer):
        shutil.copytree(tokenizer, tmp, dirs_exist_ok=True)
      hf.save(run.model, jax.tree.map(sharding.to_host, run.params), tmp)
      os.rename(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    logging.info("wrote %s", out)
  return out


EXPORT_KINDS = ("params", "transformers")


def tokenizer_dirs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """{"tokenizer": dir, "llm_tokenizer": dir} of the tokenizers a run reads from disk: those
  the workdir holds (synthetic and trained ones), else the configured directories."""
  out = {}
  for field in ("tokenizer", "llm_tokenizer"):
    kept = os.path.join(os.path.abspath(workdir), field)
    spec = config.data[field]
    if os.path.isfile(os.path.join(kept, "tokenizer_config.json")):
      out[field] = kept
    elif spec and os.path.isdir(spec):
      out[field] = spec
  return out


def export_workdir(
  config: ml_collections.ConfigDict, workdir: str, kind: str, out: str, *, overwrite: bool = False
) -> dict:
  """Exports a trained workdir's latest checkpoint (l2s_jax.export) with its tokenizers:
  "params" (the trainable params, for `decode.params=export:DIR`) or "transformers" (a plain
  model as a transformers directory, OUT/model). Returns the manifest (process 0 writes)."""
  if kind not in EXPORT_KINDS:
    raise ValueError(f"export kind {kind!r}: use one of {EXPORT_KINDS}")
  if kind == "transformers" and config.model.kind != "plain":
    raise ValueError(
      "a hybrid's SLM reads its LLM's states, so it is no transformers model "
      "alone: export kind 'params' (model.kind is 'hybrid')"
    )
  if os.path.exists(out) and not overwrite:
    raise ValueError(
      f"export directory {out!r} already exists; pass --overwrite to replace "
      f"it (the old one is kept until the new one is complete)"
    )
  run = _trained(config, workdir, None)
  host = jax.tree.map(sharding.to_host, run.trainable)
  toks = tokenizer_dirs(config, workdir)
  if jax.process_index() != 0:
    return {}
  if kind == "params":
    return export.export_params(
      host, out, config=config, step=run.step, overwrite=overwrite, tokenizers=toks
    )
  return export.export_transformers(
    run.model,
    host,
    out,
    config=config,
    step=run.step,
    overwrite=overwrite,
    tokenizer=toks.get("tokenizer"),
  )


def param_bytes(run: Assembly) -> dict:
  """Bytes per device of the params a decoder reads (the frozen LLM included)."""
  return {
    "all": sharding.bytes_per_device(run.params),
    "frozen_llm": sharding.bytes_per_device(run.frozen),
    "trainable": sharding.bytes_per_device(run.trainable),
  }
