"""Checkpoint directories: sharded files, dtypes, and clear errors for bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import torch_reference as ref
from l2s_jax import hf
from l2s_jax.hf import CheckpointError


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt2")
  model = ref.gpt2()
  model.save_pretrained(path)
  return path, model


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def test_sharded_checkpoint_loads(gpt2_dir, tmp_path):
  path, torch_model = gpt2_dir
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
  model, params = hf.load(str(tmp_path / "sharded"))
  ids, mask = ref.padded_batch(0, 2, 9, 97)
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(ref.jitted(model)(params, ids, mask)), expected,
                             atol=1e-4)


def test_bfloat16_load(gpt2_dir):
  path, torch_model = gpt2_dir
  model, params = hf.load(str(path), dtype="bfloat16")
  assert {np.dtype(x.dtype) for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}
  ids, mask = ref.padded_batch(1, 2, 9, 97)
  got = np.asarray(ref.jitted(model)(params, ids, mask)).astype(np.float32)
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  # bf16 keeps ~3 significant digits; the argmax of most positions survives.
  assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max() + 0.1
  assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.8


def test_save_bfloat16_and_keep_other_files(gpt2_dir, tmp_path):
  path, _ = gpt2_dir
  model, params = hf.load(str(path))
  out = tmp_path / "out"
  out.mkdir()
  (out / "tokenizer.json").write_text("{}")
  hf.save(model, params, str(out), dtype="bfloat16")
  assert (out / "tokenizer.json").read_text() == "{}"
  tensors = load_file(str(out / "model.safetensors"))
  assert str(tensors["transformer.wte.weight"].dtype) == "bfloat16"
  assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_missing_directory():
  with pytest.raises(CheckpointError, match="does-not-exist.*does not exist"):
    hf.load("/tmp/does-not-exist-l2s")


def test_missing_config(tmp_path):
  with pytest.raises(CheckpointError, match="config.json.*missing"):
    hf.load(str(tmp_path))


def test_invalid_config_json(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  (path / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    hf.load(str(path))


def test_unsupported_model_type(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["model_type"] = "bert"
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
    hf.load(str(path))


def test_missing_weights_file(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  os.remove(path / "model.safetensors")
  (path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="no model.safetensors.*PyTorch .bin"):
    hf.load(str(path))


def test_missing_tensor_is_named(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["transformer.h.1.mlp.c_fc.weight"]
  save_file(tensors, str(path / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"'h\.1\.mlp\.c_fc\.weight' is missing.*\(32, 48\)"):
    hf.load(str(path))


def test_misshaped_tensor_names_both_shapes(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  tensors = load_file(str(path / "model.safetensors"))
  tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((32, 31), np.float32)
  save_file(tensors, str(path / "model.safetensors"))
  with pytest.raises(CheckpointError,
                     match=r"'h\.0\.attn\.c_proj\.weight' has shape \(32, 31\).*\(32, 32\)"):
    hf.load(str(path))


def test_corrupt_safetensors(gpt2_dir, tmp_path):
  path = _copy(gpt2_dir[0], tmp_path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
    hf.load(str(path))


def test_unsupported_rope_scaling(tmp_path):
  model = ref.llama()
  model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
    hf.load(str(tmp_path))


@pytest.mark.parametrize("make, encoder_only", [
    (lambda: ref.t5("t5"), None), (lambda: ref.t5("t5v1_1"), None),
    (lambda: ref.t5("t5"), True), (ref.gpt2, None), (ref.qwen2, None)],
    ids=["t5-tied", "t5-untied", "t5-encoder", "gpt2", "qwen2"])
def test_load_module_gives_the_module_load_gives(tmp_path, make, encoder_only):
  """hf.load_module (the module alone; only the tensors the config needs are read) builds
  exactly the module of hf.load, tied and untied T5 heads included."""
  make().save_pretrained(tmp_path)
  model, _ = hf.load(str(tmp_path), encoder_only=encoder_only)
  assert hf.load_module(str(tmp_path), encoder_only=encoder_only) == model
