"""Model adapters (one per model kind), the run built once for training, partner loading."""

import json
import os
import re
import types
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as fx
from l2s_jax import assemble, sharding, train_lib
from l2s_jax.data import synthetic
from l2s_jax.data.tokenize import ByteTokenizer, load_tokenizer
from l2s_jax.models import GPT2, Llama, LLMToSLM, T5, adapter_for, init_boxed, t5
from l2s_jax.models.adapters import DecoderOnly, EncoderDecoder, Hybrid
from l2s_jax.models.gpt2 import GPT2Config
from l2s_jax.models.llama import LlamaConfig
from l2s_jax.train_step import logits_and_targets

T5_TINY = t5.T5Config(
  vocab_size=40,
  d_model=16,
  d_kv=4,
  d_ff=32,
  num_layers=1,
  num_decoder_layers=1,
  num_heads=2,
  decoder_start_token_id=7,
)


def _t5(**kw):
  return T5(T5_TINY, **kw)


def _gpt2():
  return GPT2(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2))


def _llama():
  return Llama(
    LlamaConfig(
      vocab_size=40,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
    )
  )


def _hybrid(slm):
  return LLMToSLM(llm=_t5(encoder_only=True), slm=slm)


def _one_device_mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _paths(tree) -> dict:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- which adapter ------------------------------------------------------------------------


def test_each_model_gets_its_kind():
  cases = [
    (_t5(), EncoderDecoder, "encoder_decoder", False),
    (_gpt2(), DecoderOnly, "decoder_only", False),
    (_llama(), DecoderOnly, "decoder_only", False),
    (_hybrid(_t5()), Hybrid, "encoder_decoder", True),
    (_hybrid(_gpt2()), Hybrid, "decoder_only", True),
    (_hybrid(_llama()), Hybrid, "decoder_only", True),
  ]
  for model, cls, kind, hybrid in cases:
    a = adapter_for(model)
    assert type(a) is cls and a.kind == kind and a.is_hybrid is hybrid, type(model)
    assert a.trained is (model.slm if hybrid else model)
  assert type(adapter_for(_hybrid(_gpt2())).slm) is DecoderOnly


# --- params: split and merge ----------------------------------------------------------------


@pytest.mark.parametrize("slm", [_t5, _gpt2])
def test_hybrid_split_merge_keeps_every_leaf(slm):
  model = _hybrid(slm())
  tree = jax.eval_shape(lambda: nn.unbox(init_boxed(model, jax.random.PRNGKey(0))))
  a = adapter_for(model)
  trainable, frozen = a.split(tree)
  assert set(trainable) == {"projector", "slm"}
  assert frozen is tree["llm"]
  assert trainable["slm"] is tree["slm"] and trainable["projector"] is tree["projector"]
  every = _paths(tree)
  parts = {**{"['llm']" + k: v for k, v in _paths(frozen).items()}, **_paths(trainable)}
  assert parts.keys() == every.keys() and len(every) > 10
  merged = a.merge(trainable, frozen)
  assert _paths(merged).keys() == every.keys()
  assert all(_paths(merged)[k] is v for k, v in every.items())


def test_plain_split_is_all_trainable():
  tree = {"embed": np.ones((3, 2)), "layers_0": {"w": np.zeros(4)}}
  for model in (_t5(), _gpt2(), _llama()):
    a = adapter_for(model)
    trainable, frozen = a.split(tree)
    assert trainable is tree and frozen == {}
    assert a.merge(trainable, frozen) is tree
  assert assemble.trainable_part(_gpt2(), tree) is tree
  hybrid_tree = {"llm": {"x": 1}, "projector": {"y": 2}, "slm": {"z": 3}}
  assert assemble.trainable_part(_hybrid(_gpt2()), hybrid_tree) == {
    "projector": {"y": 2},
    "slm": {"z": 3},
  }


# --- prompts ----------------------------------------------------------------------------


def _decoder_only_batch():
  tokens = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 11, 12, 13, 1], [4, 3, 1, 0, 0, 0]], np.int32)
  mask = (tokens > 0).astype(np.int32)
  lengths = np.array([2, 3, 1], np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]], np.int32)
  return {"tokens": tokens, "tokens_mask": mask, "loss_mask": loss_mask, "prompt_lengths": lengths}


def test_decoder_only_prompt_is_the_first_prompt_lengths_tokens():
  ids, mask = adapter_for(_gpt2()).prompt(_decoder_only_batch())
  np.testing.assert_array_equal(ids, [[5, 6, 0], [9, 10, 11], [4, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
  ids, mask = adapter_for(_hybrid(_llama())).prompt(_decoder_only_batch())
  np.testing.assert_array_equal(ids, [[5, 6, 0], [9, 10, 11], [4, 0, 0]])


def test_encoder_decoder_prompt_is_the_inputs():
  batch = {"inputs": np.array([[3, 4, 1]]), "inputs_mask": np.array([[1, 1, 1]])}
  ids, mask = adapter_for(_hybrid(_t5())).prompt(batch)
  assert ids is batch["inputs"] and mask is batch["inputs_mask"]


def test_prompt_extras_cut_overlap_to_the_prompt_width():
  rng = np.random.RandomState(0)
  overlap = rng.randint(0, 2, (2, 6, 5)).astype(np.float32)
  llm = np.arange(10).reshape(2, 5)
  batch = {"llm_inputs": llm, "llm_inputs_mask": np.ones_like(llm), "overlap": overlap}
  extra = adapter_for(_hybrid(_gpt2())).prompt_extras(batch, 4)
  assert set(extra) == {"llm_input_ids", "llm_attention_mask", "overlap"}
  assert extra["overlap"].shape == (2, 4, 5)
  np.testing.assert_array_equal(extra["overlap"], overlap[:, :4])
  assert extra["llm_input_ids"] is llm
  del batch["overlap"]  # one tokenizer: no overlap
  assert set(adapter_for(_hybrid(_t5())).prompt_extras(batch, 4)) == {
    "llm_input_ids",
    "llm_attention_mask",
  }
  for model in (_t5(), _gpt2(), _llama()):
    assert adapter_for(model).prompt_extras(batch, 4) == {}


def test_partner_inputs():
  ids, mask = np.array([[3, 4]]), np.array([[1, 1]])
  out = adapter_for(_hybrid(_t5())).partner_inputs(ids, mask)
  assert out == {"llm_input_ids": ids, "llm_attention_mask": mask}
  for model in (_t5(), _gpt2(), _llama()):
    assert adapter_for(model).partner_inputs(ids, mask) == {}


# --- loss inputs ----------------------------------------------------------------------


def test_decoder_only_hybrid_loss_inputs():
  batch = _decoder_only_batch()
  loss = adapter_for(_hybrid(_gpt2())).loss_inputs(batch)
  prompt_mask = [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
  assert set(loss.inputs) == {
    "input_ids",
    "attention_mask",
    "llm_input_ids",
    "llm_attention_mask",
    "prompt_mask",
  }
  assert loss.inputs["input_ids"] is batch["tokens"]
  np.testing.assert_array_equal(loss.inputs["prompt_mask"], prompt_mask)
  np.testing.assert_array_equal(loss.inputs["llm_attention_mask"], prompt_mask)
  np.testing.assert_array_equal(
    loss.inputs["llm_input_ids"], [[5, 6, 0, 0, 0, 0], [9, 10, 11, 0, 0, 0], [4, 0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(loss.targets, batch["tokens"][:, 1:])
  np.testing.assert_array_equal(loss.weights, batch["loss_mask"][:, 1:])
  assert loss.next_token
  logits = jnp.zeros((3, 6, 40))
  assert loss.scored(logits).shape == (3, 5, 40)

  # The LLM's own tokens (two tokenizers) are read as the batch gives them, with overlap.
  batch.update(
    llm_inputs=np.array([[21, 22, 23]] * 3),
    llm_inputs_mask=np.ones((3, 3)),
    overlap=np.ones((3, 6, 3)),
  )
  loss = adapter_for(_hybrid(_gpt2())).loss_inputs(batch)
  assert loss.inputs["llm_input_ids"] is batch["llm_inputs"]
  assert loss.inputs["llm_attention_mask"] is batch["llm_inputs_mask"]
  assert loss.inputs["overlap"] is batch["overlap"]  # whole: training sees every row
  plain = adapter_for(_gpt2()).loss_inputs(batch)
  assert set(plain.inputs) == {"input_ids", "attention_mask"}


def test_encoder_decoder_loss_inputs_shift_the_targets():
  batch = {
    "inputs": np.array([[3, 4, 1], [5, 1, 0]]),
    "inputs_mask": np.array([[1, 1, 1], [1, 1, 0]]),
    "targets": np.array([[8, 9, 1], [10, 1, 0]]),
    "targets_mask": np.array([[1, 1, 1], [1, 1, 0]]),
  }
  loss = adapter_for(_hybrid(_t5())).loss_inputs(batch)
  np.testing.assert_array_equal(loss.inputs["decoder_input_ids"], [[7, 8, 9], [7, 10, 1]])
  assert loss.inputs["llm_input_ids"] is batch["inputs"]
  assert loss.inputs["llm_attention_mask"] is batch["inputs_mask"]
  assert "prompt_mask" not in loss.inputs and not loss.next_token
  assert loss.targets is batch["targets"] and loss.weights is batch["targets_mask"]
  plain = adapter_for(_t5()).loss_inputs(batch)
  assert set(plain.inputs) == {"input_ids", "attention_mask", "decoder_input_ids"}


def test_logits_and_targets_of_a_decoder_only_model_score_the_next_token():
  model = _gpt2()
  params = jax.jit(lambda r: nn.unbox(init_boxed(model, r)))(jax.random.PRNGKey(0))
  batch = _decoder_only_batch()
  logits, targets, weights = logits_and_targets(model, {"params": params}, batch)
  full = model.apply({"params": params}, batch["tokens"], batch["tokens_mask"])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, :-1], rtol=1e-6)
  np.testing.assert_array_equal(targets, batch["tokens"][:, 1:])
  np.testing.assert_array_equal(weights, batch["loss_mask"][:, 1:])


# --- the run built once -----------------------------------------------------------------


def test_training_uses_the_assembly_as_built(tmp_path, monkeypatch):
  """train_run reads the Assembly's mesh and shardings: no second abstract init, no
  second sharding plan."""
  c = fx.tiny_config("gpt2", steps=2, checkpoint_every=2)
  run = assemble.initial(c, _one_device_mesh(), vocab_size=fx.VOCAB)

  def refuse(*a, **k):
    raise AssertionError("built twice")

  monkeypatch.setattr(assemble, "param_shardings", refuse)
  monkeypatch.setattr(assemble, "mesh_from_config", refuse)
  summary = train_lib.train_run(run, str(tmp_path), train_data=fx.ChainTask(0, 8, "gpt2"))
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  assert not hasattr(train_lib, "_count")


# --- partners ----------------------------------------------------------------------------


def _preset_group(overrides: dict):
  group = assemble.source_group("preset", "gpt2")
  group.overrides = json.dumps(overrides)
  return group


def test_partner_names_of_equal_length_get_their_own_init():
  c = fx.tiny_config("gpt2")
  group = _preset_group(dict(n_embd=16, n_layer=1, n_head=2, n_positions=32))
  pipeline = types.SimpleNamespace(vocab_size=fx.VOCAB)
  mesh = _one_device_mesh()
  load = lambda name: jax.tree.map(
    np.asarray, assemble.load_source(c, group, name, pipeline, mesh)[1]
  )
  a, b, again = load("aaaa"), load("bbbb"), load("aaaa")
  leaves = lambda t: jax.tree.leaves(t)
  assert len(leaves(a)) == len(leaves(b)) > 0
  assert any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  for x, y in zip(leaves(a), leaves(again)):
    np.testing.assert_array_equal(x, y)
  assert assemble.name_seed("aaaa") == zlib.crc32(b"aaaa") & 0x7FFFFFFF
  assert assemble.name_seed("aaaa") != assemble.name_seed("bbbb")


def test_a_partner_workdir_loads_without_a_data_pipeline(tmp_path, monkeypatch):
  c = fx.tiny_config("gpt2", steps=1, checkpoint_every=1)
  c.model.kind = "plain"
  workdir = str(tmp_path / "partner")
  task = synthetic.SyntheticTask(synthetic.SyntheticTaskConfig(**c.data.synthetic.to_dict()))
  tokenizer = synthetic.build_tokenizer(task, os.path.join(workdir, "tokenizer"))
  vocab = len(tokenizer)
  mesh = _one_device_mesh()
  run = assemble.initial(c, mesh, vocab_size=vocab)
  train_lib.train_run(run, workdir, train_data=fx.ChainTask(0, 8, "gpt2"))
  expected_model, expected = assemble.load_trained(
    assemble.config_from_workdir(workdir), workdir, mesh
  )

  def refuse(*a, **k):
    raise AssertionError("a second data pipeline")

  monkeypatch.setattr(assemble, "data_pipeline", refuse)
  monkeypatch.setattr(assemble, "build_pipeline", refuse)
  group = assemble.source_group("workdir", workdir)
  ours = types.SimpleNamespace(
    tokenizer=load_tokenizer(os.path.join(workdir, "tokenizer")), vocab_size=vocab
  )
  model, params = assemble.load_source(c, group, "collab", ours, mesh)
  assert model.config.vocab_size == vocab == expected_model.config.vocab_size
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  other = types.SimpleNamespace(tokenizer=ByteTokenizer(), vocab_size=ByteTokenizer.vocab_size)
  with pytest.raises(
    ValueError, match=re.escape(f"collab.workdir {workdir!r} was trained with another tokenizer")
  ):
    assemble.load_source(c, group, "collab", other, mesh)
