"""Every parameter carries logical axis names, one per dimension."""

import flax.linen as nn
import jax
import pytest

from l2s_jax.models import GPT2, Llama, T5, gpt2, init_boxed, llama, t5

KNOWN_AXES = {
  "vocab",
  "embed",
  "heads",
  "kv_heads",
  "head_dim",
  "mlp",
  "rel_buckets",
  "positions",
  None,
}


def _tiny_models():
  import dataclasses

  yield T5(
    dataclasses.replace(
      t5.PRESETS["t5-v1_1-small"],
      vocab_size=64,
      d_model=16,
      d_kv=4,
      d_ff=32,
      num_layers=1,
      num_decoder_layers=1,
      num_heads=2,
    )
  )
  yield T5(
    dataclasses.replace(
      t5.PRESETS["t5-small"],
      vocab_size=64,
      d_model=16,
      d_kv=4,
      d_ff=32,
      num_layers=1,
      num_decoder_layers=1,
      num_heads=2,
    )
  )
  yield GPT2(
    dataclasses.replace(
      gpt2.PRESETS["gpt2"], vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2
    )
  )
  yield Llama(
    dataclasses.replace(
      llama.PRESETS["qwen2-0.5b"],
      vocab_size=64,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
    )
  )


@pytest.mark.parametrize("model", list(_tiny_models()), ids=lambda m: type(m).__name__)
def test_every_param_has_axis_names(model):
  boxed = jax.eval_shape(lambda: init_boxed(model, jax.random.PRNGKey(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= KNOWN_AXES
