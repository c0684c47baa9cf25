"""Every config file loads, passes the schema and names presets that exist."""

import glob
import importlib.util
import json
import os

import pytest

from l2s_jax import config_schema
from l2s_jax.models import gpt2, llama, t5

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))
ARGS = {"demo.py": ["llm", "hybrid", "slm"], "t5_large_to_t5_small_wmt14_ende.py": [None, "fsdp"]}


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
    config_schema.validate(c)
    for group in ("llm", "slm"):
      if c[group].preset:
        assert c[group].preset in presets, c[group].preset
      if c[group].overrides:
        json.loads(c[group].overrides)
