"""The default job's configs, for `train.py --config configs/demo.py:<which>`.

They ship inside the package (`l2s_jax/configs/demo.py`, where an installed
l2s_jax finds them); this file only points there. See that file for the systems.
"""

from l2s_jax.configs.demo import get_config  # noqa: F401
