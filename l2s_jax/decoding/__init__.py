"""Decoding: one compiled while_loop for every model kind."""

from l2s_jax.decoding.beam import BeamSearchOutput, beam_search, beam_search_loop
from l2s_jax.decoding.loop import GenerateOutput, decode_loop, generate
from l2s_jax.decoding.prompts import DEFAULT_BUCKETS, prepare_prompts
from l2s_jax.decoding.sampling import Chain, Greedy, Sampler, Temperature, TopK, TopP, chain
from l2s_jax.decoding.state import DecodeState

__all__ = ["generate", "decode_loop", "GenerateOutput", "DecodeState", "beam_search",
           "beam_search_loop", "BeamSearchOutput", "prepare_prompts", "DEFAULT_BUCKETS",
           "Sampler", "Greedy", "Temperature", "TopK", "TopP", "Chain", "chain"]
