"""The default offline experiment on the synthetic task (see l2s_jax/demo_lib.py).

  python train.py --config configs/demo.py:llm --workdir DIR/llm
  python train.py --config configs/demo.py:hybrid --workdir DIR/hybrid --config.llm.path=DIR/llm/transformers
  python train.py --config configs/demo.py:slm --workdir DIR/slm

"llm":    a T5 encoder-decoder of a few million parameters, trained on the task;
"hybrid": its frozen encoder + projector + an SLM about 10x smaller (LLM-to-SLM);
"slm":    the same SLM alone, with the same training budget (the baseline).

For the speculative-decoding bench (bench/speculative.py --pairs trained_wide):

  python train.py --config configs/demo.py:llm_wide --workdir DIR/llm_wide
  python -m l2s_jax.demo --workdir DIR --export llm_wide
  python train.py --config configs/demo.py:hybrid_wide --workdir DIR/hybrid_wide \
      --config.llm.path=DIR/llm_wide/transformers

"llm_wide":    the LLM with 16384-wide feed-forward blocks (39M parameters: a decoding
               step reads ~150 MB of weights, the cost regime of real LLMs), trained
               from scratch on the task; half the batch of "llm" to fit a CPU budget,
               the FFN outputs' learning rate scaled by 512/16384 (muP);
"hybrid_wide": LLM-to-SLM on that LLM's frozen encoder.

  python bench/grow_llm.py --workdir DIR          # writes DIR/llm_grown_init
  python train.py --config configs/demo.py:llm_grown --workdir DIR/llm_grown \
      --config.slm.path=DIR/llm_grown_init

"llm_grown":   the trained demo LLM grown to llm_wide's shapes (new hidden units with zero
               output rows: the same function, Net2WiderNet-style) and trained on at
               that size, all 39M parameters, for 300 more steps at a lower rate.
"""

from l2s_jax.config_schema import base_config

LLM = dict(d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=6, num_heads=4)
LLM_WIDE = dict(LLM, d_ff=16384)
SLM = dict(d_model=48, d_kv=12, d_ff=192, num_layers=1, num_decoder_layers=1, num_heads=4)


def get_config(which: str = "hybrid"):
  if which not in ("llm", "hybrid", "slm", "llm_wide", "hybrid_wide", "llm_grown"):
    raise ValueError(
      f"configs/demo.py:{which}: use llm, hybrid, slm, llm_wide, hybrid_wide or llm_grown"
    )
  grown = which == "llm_grown"
  wide = which.endswith("_wide") or grown
  which = "llm" if grown else which.removesuffix("_wide")
  c = base_config()
  c.data.synthetic.num_train = 100000
  c.data.synthetic.nouns = 100
  c.data.synthetic.adjectives = 25
  c.data.synthetic.verbs = 40
  c.data.synthetic.max_adjectives = 2
  c.data.synthetic.num_validation = 300
  c.data.synthetic.num_test = 300
  c.data.prompt_buckets = (16, 32)
  c.data.target_buckets = (16, 32, 48)
  c.data.max_prompt_len = 32
  c.data.max_target_len = 48
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.checkpoint_every = 500
  c.mesh.data = -1  # all devices (1 on a plain CPU, 8 simulated in the tests)
  c.opt.warmup_steps = 50
  c.opt.clip_norm = 1.0
  c.decode.max_new_tokens = 48
  c.decode.batch_size = 50
  c.decode.batch1_examples = 30
  c.model.kind = "plain" if which != "hybrid" else "hybrid"
  model = (LLM_WIDE if wide else LLM) if which == "llm" else SLM
  c.slm.preset = "t5-small"  # T5 shapes: ReLU FFN, tied embeddings
  c.slm.overrides = model
  if which == "llm":
    c.train.steps = 1800
    c.opt.learning_rate = 1e-3
    c.opt.warmup_steps = 100
    if wide:
      c.train.batch_size = 16
      c.train.checkpoint_every = 100
      # muP for the widened dimension: the FFN output's Adam steps scaled by 1/width
      # relative to the demo LLM, or its 32x wider sum swamps the residual stream
      # (at the demo's rate alone the loss stalls near 2.0).
      c.opt.lr_multipliers = (("/mlp/wo$", LLM["d_ff"] / LLM_WIDE["d_ff"]),)
    if grown:  # from a trained model (slm.path): a short, gentle run
      c.train.steps = 300
      c.opt.learning_rate = 3e-4
      c.opt.warmup_steps = 30
  else:
    c.train.steps = 1200
    c.opt.learning_rate = 3e-3
  if which == "hybrid":
    c.llm.preset = "t5-small"  # the LLM's shapes; the demo sets llm.path to
    c.llm.overrides = LLM_WIDE if wide else LLM  # the trained LLM (without it: a random
    # encoder)
  return c
