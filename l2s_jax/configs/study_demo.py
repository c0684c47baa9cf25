"""The collaboration study on the default job's models (FS-GEN's analyses), as one config.

  python -m l2s_jax.demo --workdir /tmp/l2s_demo        # the LLM, SLM and hybrid first
  python study.py --config configs/study_demo.py:/tmp/l2s_demo --workdir /tmp/l2s_demo/collab

The LLM is the demo's trained T5 (ROOT/llm); the demo's SLM and LLM-to-SLM hybrid are
studied as trained (1200 steps), and five SLMs of widths 16-64 are trained here from the demo
SLM's recipe with one budget of 600 steps, so the scaling law sees the size ratio alone. The
routers sweep on the demo SLM and on the hybrid (the small model), in batches of 8 prompts.
"""

import os

from l2s_jax.config_study import study_config
from l2s_jax.configs import demo


def get_config(root: str = "/tmp/l2s_demo"):
  c = study_config()
  recipe = demo.get_config("slm")
  for group in recipe.keys():  # data, model, slm, opt, train, decode ... of the SLM
    c[group] = recipe[group]
  c.train.steps = 600  # the budget of every SLM the study trains
  c.collab.workdir = os.path.join(root, "llm")
  c.decode.max_examples = 100
  c.decode.batch_size = 8
  c.study.slms = (
    f"slm=workdir:{os.path.join(root, 'slm')}",
    f"hybrid=workdir:{os.path.join(root, 'hybrid')}",
  )
  c.study.widths = (16, 24, 32, 48, 64)
  c.study.sweep_on = ("slm", "hybrid")
  return c
