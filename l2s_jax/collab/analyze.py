"""The collaboration study on the default job's models (configs/study_demo.py).

  python -m l2s_jax.collab.analyze --workdir /tmp/l2s_demo

Needs `python -m l2s_jax.demo --workdir DIR` first; writes DIR/collab (l2s_jax/study_lib.py
says what each number and plot is). The same as `python study.py --config
configs/study_demo.py:DIR --workdir DIR/collab`, which takes any other study config.
"""

from __future__ import annotations

import argparse
import os

from l2s_jax import console, study_lib
from l2s_jax.configs import study_demo


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/l2s_demo")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of a user error instead of one line")
  args = parser.parse_args(argv)
  console.setup_logging()
  out = os.path.join(args.workdir, "collab")
  with console.user_errors(args.debug):
    report = study_lib.run_study(study_demo.get_config(args.workdir), out)
  print(study_lib.summary(report))
  print(f"\nwritten: {out}/study.json and plots")


if __name__ == "__main__":
  main()
