"""Compile every program of a config's job for a TPU slice, from this machine (no TPU):
per-chip memory against the HBM, FLOPs, HBM bytes, collectives and a roofline estimate.

python compile.py --config configs/t5_large_to_t5_small_wmt14_ende.py:fsdp --topology v5e:2x4
python compile.py --workdir /runs/ende --topology v5p:2x2x1 --json /tmp/ende_v5p.json
"""

import os

# Compiling only: the TPU slice comes from libtpu's description, and no local accelerator is
# used (nor its lock taken, nor its absence reported). JAX_PLATFORMS set by the user wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from l2s_jax import compile_lib, console, files  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string(
  "workdir", None, "A trained workdir: its checkpoint's config (when --config is not given)."
)
flags.DEFINE_string("topology", None, "A TPU slice libtpu knows: v5e:2x4, v4:2x2x1, v6e:4x4, ...")
flags.DEFINE_list("programs", list(compile_lib.PROGRAMS), "Which of the job's programs to compile.")
flags.DEFINE_string("json", None, "Write the report here as JSON too.")
flags.DEFINE_bool(
  "debug",
  False,
  "Show the traceback of a user error (config, paths, topology) instead of one line.",
)
flags.mark_flags_as_required(["topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with console.user_errors(FLAGS.debug):
    console.setup_logging()
    config = compile_lib.job_config(FLAGS.config, FLAGS.workdir)
    report = compile_lib.compile_job(
      config, FLAGS.topology, programs=FLAGS.programs, workdir=FLAGS.workdir
    )
    if FLAGS.json:
      files.write_json(FLAGS.json, compile_lib.as_json(report), indent=2)
  print(compile_lib.table(report), flush=True)


if __name__ == "__main__":
  app.run(main)
