"""Evaluate a trained model (or a plain LLM/SLM) on a split; writes DIR/eval/*.json.

python eval.py --config configs/tiny.py --workdir /tmp/run [--config.decode.num_beams=4]
"""

from absl import app, flags
from ml_collections import config_flags

from l2s_jax import console, eval_lib, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "The training workdir (checkpoints); results go to DIR/eval.")
flags.DEFINE_bool(
  "debug",
  False,
  "Show the traceback of a user error (config, paths, data, checkpoints) instead of one line.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with console.user_errors(FLAGS.debug):
    sharding.maybe_initialize_distributed()  # multi-host: before JAX touches a device
    console.setup_logging()
    report = eval_lib.evaluate(FLAGS.config, FLAGS.workdir)
  console.print_on_first_process(console.summary_line(report))


if __name__ == "__main__":
  app.run(main)
