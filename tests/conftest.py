"""Every test sees 8 simulated CPU devices, float32 matmuls at full precision.

XLA compiles at backend optimization level 0 in the tests: compiling dominates the suite's
time (tiny models, dozens of programs per test) and level 0 compiles about a third faster;
the suite passes at the default level too (put --xla_backend_optimization_level in XLA_FLAGS
to choose another).
"""

import os

# Must happen before JAX is imported anywhere.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  """Two unrelated random GPT-2s over 6 tokens (about a third of one's drafts are kept by the
  other): [(torch model, our model, params, directory)] x 2, for the sampling tests."""
  import torch_reference as ref
  from l2s_jax import hf

  out = []
  for seed in (0, 1):
    tm = ref.gpt2(seed=seed, vocab_size=6, n_positions=16, initializer_range=0.2)
    path = tmp_path_factory.mktemp(f"tiny{seed}")
    tm.save_pretrained(path)
    out.append((tm, *hf.load(str(path)), str(path)))
  return out
