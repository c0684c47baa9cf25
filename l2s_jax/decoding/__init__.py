"""Decoding: one front (`decode`) over method specs, each one compiled `lax.while_loop`.

    from l2s_jax.decoding import Sample, Beam, Greedy, TopK, decode
    out = decode(Sample(TopK(40)), model, params, ids, mask, max_new_tokens=32, eos_id=1)

The collaborative methods' specs (Speculative, Combined, Routed) are in `l2s_jax.collab`.
`generate` and `beam_search` are the front with Sample and Beam.
"""

from l2s_jax.decoding.beam import Beam, beam_search, beam_search_loop
from l2s_jax.decoding.front import decode, lower
from l2s_jax.decoding.loop import Sample, decode_loop, generate
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS, prepare_prompts
from l2s_jax.decoding.sampling import Chain, Greedy, Sampler, Temperature, TopK, TopP, chain
from l2s_jax.decoding.spec import Decoded, DecodeSpec, Inputs, SpecError, summarize
from l2s_jax.decoding.state import DecodeState

__all__ = [
  "decode",
  "lower",
  "Decoded",
  "summarize",
  "DecodeSpec",
  "Inputs",
  "SpecError",
  "Sample",
  "Beam",
  "generate",
  "beam_search",
  "decode_loop",
  "beam_search_loop",
  "DecodeState",
  "prepare_prompts",
  "DEFAULT_BUCKETS",
  "Sampler",
  "Greedy",
  "Temperature",
  "TopK",
  "TopP",
  "Chain",
  "chain",
]
