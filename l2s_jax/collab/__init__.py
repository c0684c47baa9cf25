"""Collaborative decoding of a large and a small model: the specs of the decoding front.

    from l2s_jax.collab import Speculative, Combined, Contrastive, Routed, Router
    from l2s_jax.decoding import decode
    out = decode(Speculative(gamma=5), (large, small), (large_params, small_params), ids, mask,
                 max_new_tokens=64, eos_id=1)

Models are ordered (large, small, ...) everywhere.
"""

from l2s_jax.collab.combine import Combined, Combiner, Contrastive, Proxy, Router, collab_generate
from l2s_jax.collab.routed import Routed, routed_generate
from l2s_jax.collab.speculative import Speculative, expected_speedup, speculative_generate

__all__ = [
  "Speculative",
  "Combined",
  "Routed",
  "Combiner",
  "Contrastive",
  "Proxy",
  "Router",
  "expected_speedup",
  "speculative_generate",
  "collab_generate",
  "routed_generate",
]
