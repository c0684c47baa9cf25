"""Exports: params, transformers directory, serialized generate; refusal of bad ones."""

import os

import jax
import numpy as np
import pytest

import torch_reference as ref
from helpers import LLM_CFG
from l2s_jax import export, hf
from l2s_jax.decoding import generate
from l2s_jax.models import LLMToSLM, T5, init_params


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
  path = tmp_path_factory.mktemp("gpt2")
  ref.gpt2().save_pretrained(path)
  slm, slm_params = hf.load(str(path))
  llm = T5(LLM_CFG, encoder_only=True)
  model = LLMToSLM(llm=llm, slm=slm)
  params = dict(init_params(model, jax.random.PRNGKey(3)), slm=slm_params)
  return model, params


def _prompts():
  ids, mask = ref.padded_batch(0, 2, 8, 97, right_pad=[(1, 3)])
  llm_ids, llm_mask = ref.padded_batch(1, 2, 6, 97, right_pad=[(0, 2)])
  return ids, mask, {"llm_input_ids": llm_ids, "llm_attention_mask": llm_mask}


def test_params_export_round_trip(hybrid, tmp_path):
  model, params = hybrid
  trainable = {"projector": params["projector"], "slm": params["slm"]}
  manifest = export.export_params(trainable, str(tmp_path / "p"), step=7)
  assert manifest["source_step"] == 7 and manifest["kind"] == "params"
  assert manifest["params"]["['projector']['in']"]["shape"] == [48, 32]
  _, loaded = export.load_params(str(tmp_path / "p"))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_transformers_export_round_trip(hybrid, tmp_path):
  model, params = hybrid
  export.export_transformers(model.slm, params["slm"], str(tmp_path / "t"))
  _, slm, slm_params = export.load_transformers(str(tmp_path / "t"))
  ids, mask, _ = _prompts()
  a = generate(slm, slm_params, ids, mask, max_new_tokens=5, eos_id=None)
  b = generate(model.slm, params["slm"], ids, mask, max_new_tokens=5, eos_id=None)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_serialized_generate_equals_the_live_function(hybrid, tmp_path):
  model, params = hybrid
  ids, mask, extra = _prompts()
  shapes = {k: (v.shape, np.int32) for k, v in extra.items()}
  export.export_generate(
    model,
    params,
    str(tmp_path / "s"),
    batch=2,
    prompt_len=8,
    max_new_tokens=6,
    eos_id=5,
    extra_shapes=shapes,
  )
  _, run = export.load_generate(str(tmp_path / "s"))
  tokens, lengths = run(ids, mask, **extra)
  live = generate(
    model, params, ids, mask, max_new_tokens=6, eos_id=5, extra_inputs=extra, prompt_buckets=None
  )
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(live.tokens))
  np.testing.assert_array_equal(np.asarray(lengths), np.asarray(live.lengths))
  with pytest.raises(ValueError, match="prompts of shape \\(2, 8\\)"):
    run(ids[:, :7], mask[:, :7], **extra)


def test_corrupt_or_incomplete_exports_are_refused(hybrid, tmp_path):
  model, params = hybrid
  good = str(tmp_path / "good")
  export.export_params({"projector": params["projector"]}, good)
  files = [os.path.join(dp, f) for dp, _, fs in os.walk(good) for f in fs if f != "manifest.json"]
  biggest = max(files, key=os.path.getsize)

  truncated = str(tmp_path / "truncated")
  os.system(f"cp -r {good} {truncated}")
  target = os.path.join(truncated, os.path.relpath(biggest, good))
  with open(target, "r+b") as f:
    f.truncate(os.path.getsize(target) // 2)
  with pytest.raises(
    export.ExportError, match="bytes, .* were written \\(truncated or replaced\\)"
  ):
    export.load_params(truncated)

  flipped = str(tmp_path / "flipped")
  os.system(f"cp -r {good} {flipped}")
  target = os.path.join(flipped, os.path.relpath(biggest, good))
  data = bytearray(open(target, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(target, "wb").write(bytes(data))
  with pytest.raises(export.ExportError, match="fails its checksum"):
    export.load_params(flipped)

  no_manifest = str(tmp_path / "no_manifest")
  os.system(f"cp -r {good} {no_manifest}")
  os.remove(os.path.join(no_manifest, "manifest.json"))
  with pytest.raises(export.ExportError, match="has no manifest.json"):
    export.load_params(no_manifest)

  with pytest.raises(export.ExportError, match="is a 'params' export, not 'stablehlo'"):
    export.load_generate(good)
  with pytest.raises(export.ExportError, match="already exists"):
    export.export_params({"projector": params["projector"]}, good)


def test_interrupted_export_leaves_nothing_that_looks_complete(hybrid, tmp_path):
  model, params = hybrid
  out = str(tmp_path / "out")

  def crash(tmp):
    export._save_params({"projector": params["projector"]}, tmp)
    raise KeyboardInterrupt("killed mid-export")

  with pytest.raises(KeyboardInterrupt):
    export.write_export(out, "params", crash)
  assert not os.path.exists(out)
  assert os.listdir(tmp_path) == []  # the temporary directory is gone too
