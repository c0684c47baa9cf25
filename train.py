"""Train LLM-to-SLM (or one plain model) from a config file.

python train.py --config configs/tiny.py --workdir /tmp/run [--config.train.steps=100]
"""

from absl import app, flags, logging
from ml_collections import config_flags

from l2s_jax import console, sharding, train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and metrics go here.")
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
    summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("done: %s", summary)


if __name__ == "__main__":
  app.run(main)
