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
  np.testing.assert_allclose(np.asarray(ref.jitted(model)(params, ids, mask)), expected, atol=1e-4)


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
  with pytest.raises(
    CheckpointError, match=r"'h\.0\.attn\.c_proj\.weight' has shape \(32, 31\).*\(32, 32\)"
  ):
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
  cfg["rope_parameters"] = {
    "rope_type": "longrope",
    "rope_theta": 1e4,
    "short_factor": [1.0] * 4,
    "long_factor": [2.0] * 4,
    "original_max_position_embeddings": 16,
  }
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    CheckpointError,
    match=r"rope_type 'longrope' is not supported; supported "
    r"rope types: \['default', 'linear', 'dynamic', 'llama3', 'yarn'\]",
  ):
    hf.load(str(tmp_path))
  # The older spelling (`rope_scaling`, `type`) is read too, and wins as in transformers.
  cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
  cfg["rope_scaling"] = {"type": "su", "factor": 2.0}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="rope_type 'su' is not supported"):
    hf.load(str(tmp_path))


def test_qwen2_sliding_window_refused_only_when_used(tmp_path):
  """Qwen2 configs carry sliding_window even when off (use_sliding_window false): those load;
  a config whose layers really use it is refused, naming the setting."""
  torch_model = ref.qwen2(use_sliding_window=False, sliding_window=8)
  torch_model.save_pretrained(tmp_path / "off")
  cfg = json.loads((tmp_path / "off" / "config.json").read_text())
  cfg["sliding_window"] = 8  # transformers writes null when off; published configs keep a number
  (tmp_path / "off" / "config.json").write_text(json.dumps(cfg))
  model, params = hf.load(str(tmp_path / "off"))
  ids, mask = ref.padded_batch(0, 2, 20, 97)
  np.testing.assert_allclose(
    np.asarray(ref.jitted(model)(params, ids, mask)),
    ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask),
    atol=1e-4,
  )
  # Every layer from max_window_layers on slides: with 2 layers and max_window_layers 1, layer 1.
  ref.qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1).save_pretrained(
    tmp_path / "on"
  )
  with pytest.raises(
    CheckpointError,
    match=r"sliding-window.*use_sliding_window=true.*"
    r"sliding_window=8.*\[1\]",
  ):
    hf.load(str(tmp_path / "on"))
  # On, but no layer past max_window_layers: nothing slides, it loads.
  ref.qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=2).save_pretrained(
    tmp_path / "unused"
  )
  assert hf.load_module(str(tmp_path / "unused")).config.num_hidden_layers == 2


# --- sharded save ----------------------------------------------------------------------------


def _files(path):
  return {f: (path / f).read_bytes() for f in sorted(os.listdir(path))}


def test_sharded_save_is_what_transformers_writes(gpt2_dir, tmp_path):
  """max_shard_size splits the weights into model-0000i-of-0000N.safetensors with the index
  transformers writes (same metadata totals, every tensor in the file the map names);
  transformers' from_pretrained and our load both read it back to the same logits."""
  path, torch_model = gpt2_dir
  model, params = hf.load(str(path))
  out = tmp_path / "ours"
  hf.save(model, params, str(out), max_shard_size="20KB")
  torch_model.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
  ours = json.loads((out / "model.safetensors.index.json").read_text())
  theirs = json.loads((tmp_path / "theirs" / "model.safetensors.index.json").read_text())
  assert set(ours) == set(theirs) == {"metadata", "weight_map"}
  assert ours["metadata"] == theirs["metadata"]  # total_size, total_parameters
  assert set(ours["weight_map"]) == set(theirs["weight_map"])
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  n = len(shards)
  assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert not (out / "model.safetensors").exists()
  for shard in shards:
    names = {k for k, f in ours["weight_map"].items() if f == shard}
    tensors = load_file(str(out / shard))
    assert set(tensors) == names
    assert sum(t.nbytes for t in tensors.values()) <= 20_000 or len(tensors) == 1
  # An int of bytes is the same size.
  hf.save(model, params, str(tmp_path / "int"), max_shard_size=20_000)
  assert _files(tmp_path / "int") == _files(out)

  import transformers as tf

  reloaded = tf.GPT2LMHeadModel.from_pretrained(out).eval()
  ids, mask = ref.padded_batch(0, 2, 9, 97, right_pad=[(1, 3)])
  expected = ref.torch_logits(torch_model, input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(
    ref.torch_logits(reloaded, input_ids=ids, attention_mask=mask), expected, atol=1e-6
  )
  model2, params2 = hf.load(str(out))
  np.testing.assert_allclose(
    np.asarray(ref.jitted(model2)(params2, ids, mask)), expected, atol=1e-4
  )


def test_resaving_switches_between_one_file_and_shards(gpt2_dir, tmp_path):
  path, _ = gpt2_dir
  model, params = hf.load(str(path))
  out = tmp_path / "out"
  out.mkdir()
  (out / "tokenizer.json").write_text("{}")
  hf.save(model, params, str(out), max_shard_size="20KB")
  assert (out / "model.safetensors.index.json").exists() and not (
    out / "model.safetensors"
  ).exists()
  hf.save(model, params, str(out), max_shard_size="40KB")  # fewer shards: the extra ones go
  n = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
  assert n == len(load_file(str(path / "model.safetensors")))
  listed = set(
    json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()
  )
  assert {f for f in os.listdir(out) if f.endswith(".safetensors")} == listed
  hf.save(model, params, str(out))  # back to one file
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert (out / "tokenizer.json").read_text() == "{}"
  hf.save(model, params, str(out), max_shard_size="1MB")  # fits one shard: one file
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_failed_sharded_save_leaves_the_previous_checkpoint(gpt2_dir, tmp_path, monkeypatch):
  """ENOSPC while writing a shard over an existing sharded directory: no file of the
  previous save is replaced or removed, no temporary is left."""
  import errno

  path, _ = gpt2_dir
  model, params = hf.load(str(path))
  out = tmp_path / "out"
  hf.save(model, params, str(out), max_shard_size="20KB")
  before = _files(out)
  real_save, calls = hf.io.save_file, {"n": 0, "fail": 0}

  def full_disk(tensors, file, metadata=None):
    calls["n"] += 1
    if calls["n"] == calls["fail"]:
      with open(file, "wb") as f:
        f.write(b"\0" * 100)
      raise OSError(errno.ENOSPC, "No space left on device")
    real_save(tensors, file, metadata=metadata)

  monkeypatch.setattr(hf.io, "save_file", full_disk)
  new_params = jax.tree.map(lambda x: x + 1, params)
  # Same shard names (the 2nd fails), other shard names, one file (the only one fails).
  for size, fail in (("20KB", 2), ("30KB", 2), ("50GB", 1)):
    calls.update(n=0, fail=fail)
    with pytest.raises(OSError, match="No space left"):
      hf.save(model, new_params, str(out), max_shard_size=size)
    assert _files(out) == before, size
  monkeypatch.setattr(hf.io, "save_file", real_save)
  hf.load(str(out))


def test_bad_shard_size_is_named(gpt2_dir, tmp_path):
  path, _ = gpt2_dir
  model, params = hf.load(str(path))
  for bad in ("5 gigabytes", "GB", -1, 0, 1.5):
    with pytest.raises(ValueError, match="max_shard_size"):
      hf.save(model, params, str(tmp_path / "out"), max_shard_size=bad)
  assert not (tmp_path / "out").exists()
  assert [hf.io.parse_size(s) for s in ("5GB", "500MB", "20kb", "1.5GB", "2GiB", 7)] == [
    5 * 10**9,
    500 * 10**6,
    20_000,
    1_500_000_000,
    2 * 2**30,
    7,
  ]


def test_index_naming_a_missing_shard(gpt2_dir, tmp_path):
  path, torch_model = gpt2_dir
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / "sharded" / shard)
  with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*{shard}"):
    hf.load(str(tmp_path / "sharded"))


@pytest.mark.parametrize(
  "make, encoder_only",
  [
    (lambda: ref.t5("t5"), None),
    (lambda: ref.t5("t5v1_1"), None),
    (lambda: ref.t5("t5"), True),
    (ref.gpt2, None),
    (ref.qwen2, None),
  ],
  ids=["t5-tied", "t5-untied", "t5-encoder", "gpt2", "qwen2"],
)
def test_load_module_gives_the_module_load_gives(tmp_path, make, encoder_only):
  """hf.load_module (the module alone; only the tensors the config needs are read) builds
  exactly the module of hf.load, tied and untied T5 heads included."""
  make().save_pretrained(tmp_path)
  model, _ = hf.load(str(tmp_path), encoder_only=encoder_only)
  assert hf.load_module(str(tmp_path), encoder_only=encoder_only) == model
