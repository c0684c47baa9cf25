"""Collaboration analyses on the demo's trained models (FS-GEN's study).

  python -m l2s_jax.collab.analyze --workdir /tmp/l2s_demo

Needs `python -m l2s_jax.demo --workdir DIR` first; writes DIR/collab
(l2s_jax/study_lib.py says what each number and plot is).
"""

from __future__ import annotations

import argparse
import os

from l2s_jax import console, study_lib


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/l2s_demo")
  parser.add_argument("--slm_sizes", default="16,32,64",
                      help="widths of extra SLMs for the scaling law ('' for none)")
  parser.add_argument("--slm_steps", type=int, default=600)
  parser.add_argument("--examples", type=int, default=100)
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of a user error instead of one line")
  args = parser.parse_args(argv)
  console.setup_logging()
  sizes = [int(s) for s in args.slm_sizes.split(",") if s]
  with console.user_errors(args.debug):
    report = study_lib.analyze(args.workdir, sizes=sizes, steps=args.slm_steps,
                               examples=args.examples)
  print(study_lib.summary(report))
  out = os.path.join(args.workdir, "collab")
  names = [n for n in ("analysis.json", "positions.png", "sweep.png", "scaling.png",
                       "svm_router.json") if os.path.exists(os.path.join(out, n))]
  print(f"\nwritten: {out}/" + ", ".join(names))


if __name__ == "__main__":
  main()
