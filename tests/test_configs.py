"""Every config file loads, passes the schema and builds the models it declares; the structured
fields (model groups' overrides, opt.lr_multipliers) from a config file, the command line, the
old JSON strings and old checkpoints' fingerprints; the retired train.seed."""

import glob
import importlib.util
import json
import os
import re
import warnings

import jax
import pytest
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from l2s_jax import build, config_fingerprint, config_schema, config_study
from l2s_jax.checkpoint import ResumeError, path_name
from l2s_jax.models import gpt2, init_boxed, llama, t5

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
ARGS = {
  "demo.py": ["llm", "hybrid", "slm", "llm_wide", "hybrid_wide", "llm_grown"],
  "t5_large_to_t5_small_wmt14_ende.py": [None, "fsdp"],
  "tiny_two_tokenizers.py": ["gpt2", "llama", "qwen2", "llm"],
}
VOCAB = 100


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
  module = _load(path)
  presets = {**t5.PRESETS, **gpt2.PRESETS, **llama.PRESETS}
  for arg in ARGS.get(os.path.basename(path), [None]):
    with warnings.catch_warnings():
      warnings.simplefilter("error", FutureWarning)  # no config of ours is in an old form
      c = module.get_config() if arg is None else module.get_config(arg)
    if "study" in c:  # a collaboration study (study.py)
      config_study.validate_study(c)
      c = config_study.recipe(c)
    config_schema.validate(c)
    for group in ("llm", "slm"):
      if c[group].preset:
        assert c[group].preset in presets, c[group].preset


# --- the demo's configs build the models they declare -------------------------------------


def _abstract_params(config):
  model = build.build_model(config, vocab_size=VOCAB)
  return {
    path_name(p): leaf.shape
    for p, leaf in jax.tree_util.tree_leaves_with_path(
      nn.unbox(jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0))))
    )
  }


def _t5_dims(shapes: dict, prefix: str) -> dict:
  """A T5's sizes, read from its params' shapes under `prefix` ("" or "slm/", "llm/")."""

  def layers(stack):
    return len({m[1] for n in shapes if (m := re.match(f"{prefix}{stack}/layers_(\\d+)/", n))})

  d_model, d_ff = shapes[f"{prefix}encoder/layers_0/mlp/wi"]
  _, heads, d_kv = shapes[f"{prefix}encoder/layers_0/self_attention/q"]
  out = dict(d_model=d_model, d_ff=d_ff, num_heads=heads, d_kv=d_kv, num_layers=layers("encoder"))
  if any(n.startswith(f"{prefix}decoder/") for n in shapes):
    out["num_decoder_layers"] = layers("decoder")
  return out


def _declared(group, keys) -> dict:
  return {k: group.overrides[k] for k in keys}


def test_demo_configs_build_the_models_they_declare():
  """Each demo system, built (abstractly) from its config: the SLM / LLM shapes are the
  overrides' ones, and llm_wide's muP rule slows exactly the wide FFNs' outputs (16384 -> 128)
  by 512/16384, nothing else."""
  module = _load(os.path.join(ROOT, "configs", "demo.py"))
  built = {}
  for which in ARGS["demo.py"]:
    c = module.get_config(which)
    config_schema.validate(c)
    shapes = _abstract_params(c)
    built[which] = shapes
    prefix = "slm/" if c.model.kind == "hybrid" else ""
    dims = _t5_dims(shapes, prefix)
    assert dims == _declared(c.slm, dims), which
    assert shapes[f"{prefix}shared/embedding"] == (VOCAB, c.slm.overrides.d_model)
    if c.model.kind == "hybrid":
      dims = _t5_dims(shapes, "llm/")  # the frozen LLM: an encoder alone
      assert dims == _declared(c.llm, dims), which
      assert "num_decoder_layers" not in dims
      assert shapes["projector/out"][-1] == c.slm.overrides.d_model
    rules = config_schema.lr_multipliers(c.opt)
    if which in ("llm_wide", "llm_grown"):
      from l2s_jax.optimizer import scale_by_path

      tx = scale_by_path(rules)
      ones = {n: 1.0 for n in shapes}
      factors, _ = tx.update(ones, tx.init(ones))
      slowed = {n for n, f in factors.items() if f != 1.0}
      assert slowed == {n for n, s in shapes.items() if s == (16384, 128)}
      assert len(slowed) == 9 and {factors[n] for n in slowed} == {512 / 16384}
    else:
      assert rules == {}
  # Negative controls: the same checks fail on a model that is not the declared one, and a
  # muP rule naming no param is refused.
  llm = module.get_config("llm")
  assert _t5_dims(built["llm_wide"], "") != _declared(llm.slm, _t5_dims(built["llm"], ""))
  wide = module.get_config("llm_wide")
  wide.opt.lr_multipliers = (("/mlp/wO$", 0.5),)
  from l2s_jax.optimizer import scale_by_path

  with pytest.raises(ValueError, match="'/mlp/wO\\$' matches no param"):
    scale_by_path(config_schema.lr_multipliers(wide.opt)).init({n: 1.0 for n in built["llm_wide"]})
  with pytest.raises(ValueError, match="configs/demo.py:big"):
    module.get_config("big")


# --- structured fields --------------------------------------------------------------------


def _tiny():
  return _load(os.path.join(ROOT, "configs", "tiny.py")).get_config()


def test_the_old_json_strings_warn_and_equal_the_structured_form():
  structured = _tiny()
  structured.opt.lr_multipliers = (("/mlp/wo$", 0.5), ("^shared", 2.0))
  old = _tiny()
  with pytest.warns(
    FutureWarning,
    match=re.escape(
      "c.<group>.overrides = {'d_model': 16, 'num_heads': 2} in a config file, "
      "--config.<group>.overrides=\"{'d_model': 16, 'num_heads': 2}\" on the command line"
    ),
  ) as w:
    old.slm.overrides = '{"d_model": 16, "num_heads": 2}'
  assert w[0].filename == __file__  # it names the line that set the string
  structured.slm.overrides = dict(d_model=16, num_heads=2)
  with pytest.warns(
    FutureWarning, match=re.escape("c.opt.lr_multipliers = (('/mlp/wo$', 0.5), ('^shared', 2.0))")
  ):
    old.opt.lr_multipliers = '{"/mlp/wo$": 0.5, "^shared": 2.0}'
  assert old.to_dict() == structured.to_dict()
  config_schema.validate(old)
  assert config_schema.lr_multipliers(old.opt) == {"/mlp/wo$": 0.5, "^shared": 2.0}
  assert (
    build.group_module(old.slm, "slm").config == build.group_module(structured.slm, "slm").config
  )
  assert build.group_module(old.slm, "slm").config.d_model == 16
  # A copy is stored: two groups given one dict do not share it.
  structured.llm.overrides = structured.slm.overrides
  structured.llm.overrides.d_model = 8
  assert structured.slm.overrides.d_model == 16
  # One bare pair is the only pair; the structure is checked with the new form in the message.
  structured.opt.lr_multipliers = ("/wo$", 0.5)
  assert structured.opt.lr_multipliers == (("/wo$", 0.5),)
  structured.opt.lr_multipliers = ("/wo$",)  # a dict on the command line ends so
  with pytest.raises(
    ValueError,
    match=re.escape("each is a (regex, factor) pair, e.g. opt.lr_multipliers = (('/mlp/wo$', 0.5)"),
  ):
    config_schema.validate(structured)


def _from_command_line(*overrides):
  values = flags.FlagValues()
  argv = ["prog", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", *overrides]
  config_flags.DEFINE_config_file(
    "config", None, flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  return values.config


def test_the_structured_fields_from_the_command_line():
  """A dict field takes a Python dict literal (the whole dict); one of its keys the config
  file set takes a value of its own; lr_multipliers takes a tuple of pairs."""
  c = _from_command_line(
    "--config.slm.overrides={'d_model': 16, 'num_heads': 2}",
    "--config.llm.overrides.d_ff=96",
    "--config.opt.lr_multipliers=(('/mlp/wo$', 0.5), ('^shared', 2))",
  )
  assert c.slm.overrides.to_dict() == {"d_model": 16, "num_heads": 2}
  assert c.llm.overrides.d_ff == 96 and c.llm.overrides.d_model == 64
  assert c.opt.lr_multipliers == (("/mlp/wo$", 0.5), ("^shared", 2))
  config_schema.validate(c)
  # The old JSON text is a dict literal as well (true/false/null are not).
  c = _from_command_line('--config.slm.overrides={"num_layers": 2}')
  assert c.slm.overrides.to_dict() == {"num_layers": 2}
  # A key the config file did not set cannot be added alone (ml_collections needs its type).
  with pytest.raises(Exception, match="num_decoder_layerz"):
    _from_command_line("--config.slm.overrides.num_decoder_layerz=2")


# --- train.seed, retired ------------------------------------------------------------------


def test_train_seed_is_gone_with_a_message_naming_the_seeds_that_work():
  c = config_schema.base_config()
  for set_it in (lambda: setattr(c.train, "seed", 1), lambda: c.train.__setitem__("seed", 1)):
    with pytest.raises(
      AttributeError,
      match=r"`seed` \(config.seed\) seeds the params' "
      "initialisation and data.seed the data order",
    ):
      set_it()
  with pytest.raises(Exception, match="config.seed.*data.seed"):
    _from_command_line("--config.train.seed=3")
  assert "seed" not in config_fingerprint.resume_fingerprint(c)["train"]
  c.seed, c.data.seed = 1, 2  # the seeds that are read: still settable
  with pytest.raises(AttributeError, match="does not exist"):
    c.train.sed = 1  # control: other unknown fields as before


# --- resume fingerprints ------------------------------------------------------------------


def _old_fingerprint(config, **train) -> dict:
  """`config`'s fingerprint as a checkpoint of the previous version stored it: overrides and
  lr_multipliers as JSON strings, train.seed present."""
  fp = config_fingerprint.resume_fingerprint(config)
  for group in ("llm", "slm"):
    fp[group]["overrides"] = json.dumps(fp[group]["overrides"]) if fp[group]["overrides"] else ""
  rules = fp["opt"]["lr_multipliers"]
  fp["opt"]["lr_multipliers"] = json.dumps(dict(rules)) if rules else ""
  fp["train"].update({"seed": 0, **train})
  return fp


@pytest.mark.parametrize("train_seed", [0, 7])
def test_a_checkpoint_of_the_json_string_form_resumes_under_the_structured_config(train_seed):
  from l2s_jax.train_lib import check_resumable

  c = _tiny()
  c.opt.lr_multipliers = (("/mlp/wo$", 0.5),)
  saved = _old_fingerprint(c, seed=train_seed)
  assert isinstance(saved["slm"]["overrides"], str) and saved["train"]["seed"] == train_seed
  with warnings.catch_warnings():
    warnings.simplefilter("error", FutureWarning)  # the checkpoint's old form: no warning
    check_resumable({"fingerprint": saved}, c)
    loaded = config_fingerprint.from_fingerprint(saved)  # e.g. a collab.workdir's config
  assert config_fingerprint.resume_fingerprint(loaded) == config_fingerprint.resume_fingerprint(c)
  assert loaded.slm.overrides.d_model == 32 and loaded.opt.lr_multipliers == (("/mlp/wo$", 0.5),)
  # Negative controls: a real difference inside the structure still blocks the resume, by
  # name; a field this version does not know still fails to load.
  c.slm.overrides.d_ff = 48
  with pytest.raises(ResumeError, match="slm.overrides.d_ff: checkpoint 64 vs config 48"):
    check_resumable({"fingerprint": saved}, c)
  c = _tiny()
  with pytest.raises(
    ResumeError,
    match=r"opt.lr_multipliers: checkpoint \[\['/mlp/wo\$', "
    r"0.5\]\] vs config \[\]",
  ):
    check_resumable({"fingerprint": saved}, c)
  saved["train"]["steps_per_loop"] = 1
  with pytest.raises(ValueError, match="holds train.steps_per_loop, which this version does"):
    config_fingerprint.from_fingerprint(saved)


def test_a_field_newer_than_the_checkpoint_blocks_resuming_only_off_its_default():
  """A checkpoint written before data.tokenizer_corpus existed resumes under the default,
  and is refused (naming the field) under another value."""
  c = config_schema.base_config()
  defaults = config_fingerprint.resume_fingerprint(c)
  saved = json.loads(json.dumps(defaults))
  del saved["data"]["tokenizer_corpus"]
  assert config_fingerprint.diff_fingerprints(saved, defaults, defaults=defaults) == []
  c.data.tokenizer_corpus = 10
  diffs = config_fingerprint.diff_fingerprints(
    saved, config_fingerprint.resume_fingerprint(c), defaults=defaults
  )
  assert diffs == ["data.tokenizer_corpus: checkpoint '<absent>' vs config 10"]
  # Without defaults every absent field is a difference (as between two processes).
  assert config_fingerprint.diff_fingerprints(saved, defaults) == [
    "data.tokenizer_corpus: checkpoint '<absent>' vs config 5000"
  ]


def test_resized_overrides_scale_the_width_alone():
  """The study's SLMs of other widths: hand-computed fields for each family."""
  g = config_schema.base_config().slm
  g.preset, g.overrides = "gpt2", dict(n_layer=1, n_embd=32, n_head=4, n_inner=48)
  assert build.resized_overrides(g, 64) == {"n_layer": 1, "n_embd": 64, "n_head": 4, "n_inner": 96}
  g.preset, g.overrides = "qwen2-0.5b", dict(hidden_size=64, intermediate_size=160)
  # Qwen2-0.5B: 14 heads, head_dim from the width; 160 * 112 / 64 = 280.
  assert build.resized_overrides(g, 112) == {"hidden_size": 112, "intermediate_size": 280}
  with pytest.raises(ValueError, match="14 heads, which must divide the width"):
    build.resized_overrides(g, 100)
  g.preset, g.overrides = "t5-small", dict(d_model=48, d_ff=192, num_heads=4)
  assert build.resized_overrides(g, 8) == {"d_model": 8, "d_ff": 32, "num_heads": 4, "d_kv": 4}
  assert g.overrides.d_model == 48  # the group itself is left as it was
  g.path = "/some/dir"
  with pytest.raises(ValueError, match="from a preset .slm.preset., not from a checkpoint"):
    build.resized_overrides(g, 8)
