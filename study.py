"""A collaboration study (FS-GEN's): an LLM, a list of SLMs, one data source, from a config.

  python study.py --config configs/study_demo.py:/tmp/l2s_demo --workdir /tmp/l2s_demo/collab
  python study.py --config my_study.py --workdir DIR [--config.study.widths='(16,32,64)']

Writes DIR/study.json and plots (l2s_jax/study_lib.py says what each number is).
"""

from absl import app, flags
from ml_collections import config_flags

from l2s_jax import console, study_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a get_config() file returning l2s_jax.config_study.study_config().",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where the study writes (and trains its SLMs).")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with console.user_errors(FLAGS.debug):
    console.setup_logging()
    report = study_lib.run_study(FLAGS.config, FLAGS.workdir)
  print(study_lib.summary(report))
  print(f"\nwritten: {FLAGS.workdir}/study.json and plots")


if __name__ == "__main__":
  app.run(main)
