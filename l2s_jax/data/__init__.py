"""Data: TFDS tasks, JSONL files, a synthetic task; tokenization and batching."""

from l2s_jax.data.batching import DECODER_ONLY, ENCODER_DECODER
from l2s_jax.data.jsonl import DataError, JsonlSource
from l2s_jax.data.loader import Batches, WorkerError
from l2s_jax.data.pipeline import Pipeline, build_pipeline, get_default_data_config
from l2s_jax.data.synthetic import SyntheticTask, SyntheticTaskConfig

__all__ = [
  "build_pipeline",
  "get_default_data_config",
  "Pipeline",
  "Batches",
  "WorkerError",
  "DataError",
  "JsonlSource",
  "SyntheticTask",
  "SyntheticTaskConfig",
  "ENCODER_DECODER",
  "DECODER_ONLY",
]
