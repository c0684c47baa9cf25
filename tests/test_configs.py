"""Every config file loads, passes the schema and names presets that exist."""

import glob
import importlib.util
import json
import os

import pytest

from l2s_jax import config_schema
from l2s_jax.models import gpt2, llama, t5

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))
ARGS = {"demo.py": ["llm", "hybrid", "slm", "llm_wide", "hybrid_wide", "llm_grown"],
        "t5_large_to_t5_small_wmt14_ende.py": [None, "fsdp"],
        "tiny_two_tokenizers.py": ["gpt2", "llama", "qwen2", "llm"]}


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
    c = module.get_config() if arg is None else module.get_config(arg)
    if "study" in c:                           # a collaboration study (study.py)
      config_schema.validate_study(c)
      c = config_schema.recipe(c)
    config_schema.validate(c)
    for group in ("llm", "slm"):
      if c[group].preset:
        assert c[group].preset in presets, c[group].preset
      if c[group].overrides:
        json.loads(c[group].overrides)


def test_demo_wide_variants_change_only_the_width_and_budget():
  """configs/demo.py:llm_wide is the demo LLM with 16384-wide FFNs (batch 16, checkpoints every
  100 steps, muP's 512/16384 for the FFN output's rate); llm_grown is llm_wide run for 300
  steps at 3e-4; hybrid_wide is the demo hybrid with that LLM's shapes for its encoder."""
  module = _load(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
  llm, wide = module.get_config("llm"), module.get_config("llm_wide")
  grown = module.get_config("llm_grown")
  assert (grown.train.steps, grown.opt.learning_rate, grown.opt.warmup_steps) == (300, 3e-4, 30)
  grown.train.steps, grown.opt.learning_rate, grown.opt.warmup_steps = 1800, 1e-3, 100
  assert grown.to_dict() == wide.to_dict()
  assert json.loads(wide.opt.lr_multipliers) == {"/mlp/wo$": 512 / 16384}
  wide.opt.lr_multipliers = ""
  assert json.loads(wide.slm.overrides) == {**json.loads(llm.slm.overrides), "d_ff": 16384}
  assert (wide.train.batch_size, wide.train.checkpoint_every) == (16, 100)
  wide.train.batch_size, wide.train.checkpoint_every = 32, 500
  wide.slm.overrides = llm.slm.overrides
  assert wide.to_dict() == llm.to_dict()
  hybrid, hybrid_wide = module.get_config("hybrid"), module.get_config("hybrid_wide")
  assert json.loads(hybrid_wide.llm.overrides)["d_ff"] == 16384
  hybrid_wide.llm.overrides = hybrid.llm.overrides
  assert hybrid_wide.to_dict() == hybrid.to_dict()
  with pytest.raises(ValueError, match="configs/demo.py:big"):
    module.get_config("big")


def test_a_field_newer_than_the_checkpoint_blocks_resuming_only_off_its_default():
  """A checkpoint written before data.tokenizer_corpus existed resumes under the default,
  and is refused (naming the field) under another value."""
  c = config_schema.base_config()
  defaults = config_schema.resume_fingerprint(c)
  saved = json.loads(json.dumps(defaults))
  del saved["data"]["tokenizer_corpus"]
  assert config_schema.diff_fingerprints(saved, defaults, defaults=defaults) == []
  c.data.tokenizer_corpus = 10
  diffs = config_schema.diff_fingerprints(saved, config_schema.resume_fingerprint(c),
                                          defaults=defaults)
  assert diffs == ["data.tokenizer_corpus: checkpoint '<absent>' vs config 10"]
  # Without defaults every absent field is a difference (as between two processes).
  assert config_schema.diff_fingerprints(saved, defaults) == [
      "data.tokenizer_corpus: checkpoint '<absent>' vs config 5000"]


def test_resized_overrides_scale_the_width_alone():
  """The study's SLMs of other widths: hand-computed fields for each family."""
  import json

  from l2s_jax import build
  from l2s_jax.config_schema import base_config
  g = base_config().slm
  g.preset, g.overrides = "gpt2", '{"n_layer": 1, "n_embd": 32, "n_head": 4, "n_inner": 48}'
  assert json.loads(build.resized_overrides(g, 64)) == {
      "n_layer": 1, "n_embd": 64, "n_head": 4, "n_inner": 96}
  g.preset, g.overrides = "qwen2-0.5b", '{"hidden_size": 64, "intermediate_size": 160}'
  # Qwen2-0.5B: 14 heads, head_dim from the width; 160 * 112 / 64 = 280.
  assert json.loads(build.resized_overrides(g, 112)) == {
      "hidden_size": 112, "intermediate_size": 280}
  with pytest.raises(ValueError, match="14 heads, which must divide the width"):
    build.resized_overrides(g, 100)
  g.preset, g.overrides = "t5-small", '{"d_model": 48, "d_ff": 192, "num_heads": 4}'
  assert json.loads(build.resized_overrides(g, 8)) == {"d_model": 8, "d_ff": 32, "num_heads": 4,
                                                       "d_kv": 4}
  g.path = "/some/dir"
  with pytest.raises(ValueError, match="from a preset .slm.preset., not from a checkpoint"):
    build.resized_overrides(g, 8)
