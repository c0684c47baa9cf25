"""Export a trained workdir's latest checkpoint, with its tokenizers.

  python export.py --config configs/tiny.py --workdir /tmp/run --kind params --out /tmp/run_export
      (evaluate it: eval.py ... --config.decode.params=export:/tmp/run_export)
  python export.py --config configs/demo.py:slm --workdir /tmp/l2s_demo/slm --kind transformers \
      --out /tmp/slm_hf
      (a plain model: OUT/model is a transformers directory with its tokenizer)

Every export is verified on load (manifest with the size and SHA-256 of each file) and written
to a temporary directory renamed into place only when complete (l2s_jax/export.py).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from l2s_jax import assemble, console, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "The config the workdir was trained with.", lock_config=True
)
flags.DEFINE_string("workdir", None, "A trained workdir (its latest checkpoint is exported).")
flags.DEFINE_enum("kind", "params", list(assemble.EXPORT_KINDS), "What to write.")
flags.DEFINE_string("out", None, "The export directory.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export (once the new one is whole).")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error instead of one line.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with console.user_errors(FLAGS.debug):
    sharding.maybe_initialize_distributed()
    console.setup_logging()
    manifest = assemble.export_workdir(
      FLAGS.config, FLAGS.workdir, FLAGS.kind, FLAGS.out, overwrite=FLAGS.overwrite
    )
  if manifest:
    logging.info(
      "wrote %s export of step %s to %s (%d files)",
      FLAGS.kind,
      manifest["source_step"],
      FLAGS.out,
      len(manifest["files"]),
    )
    console.print_on_first_process(
      f"exported step {manifest['source_step']} ({FLAGS.kind}) to {FLAGS.out}"
    )


if __name__ == "__main__":
  app.run(main)
