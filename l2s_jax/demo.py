"""The default job: a complete LLM-to-SLM experiment, offline, in minutes.

  python -m l2s_jax.demo --workdir /tmp/l2s_demo

trains the LLM, LLM-to-SLM and the SLM alone on the synthetic task, evaluates
the three and prints one table (l2s_jax/demo_lib.py says what each step does).

  python -m l2s_jax.demo --workdir /tmp/l2s_demo --export llm_wide

only writes a trained plain model of configs/demo.py (llm, slm, llm_wide,
llm_grown) as DIR/<which>/transformers, e.g. for --config.llm.path.
On real data and checkpoints the same steps run from configs (README).
"""

from __future__ import annotations

import argparse

from l2s_jax import console, demo_lib


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/l2s_demo")
  parser.add_argument(
    "--test_budget",
    action="store_true",
    help="a few steps only (checks the pipeline, not the claim)",
  )
  parser.add_argument(
    "--debug", action="store_true", help="show the traceback of a user error instead of one line"
  )
  parser.add_argument(
    "--export",
    choices=demo_lib.EXPORTABLE,
    default=None,
    help="only write DIR/<which>/transformers from that model's trained "
    "checkpoints (configs/demo.py:<which>), e.g. for --config.llm.path",
  )
  args = parser.parse_args(argv)
  console.setup_logging()
  with console.user_errors(args.debug):
    if args.export:
      print(demo_lib.export_system(args.workdir, args.export, test_budget=args.test_budget))
      return
    demo_lib.run_demo(args.workdir, test_budget=args.test_budget)


if __name__ == "__main__":
  main()
