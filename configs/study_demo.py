"""The collaboration study on the default job's models, for `study.py --config
configs/study_demo.py:ROOT` (ROOT: the demo's workdir).

It ships inside the package (`l2s_jax/configs/study_demo.py`); this file only points there.
"""

from l2s_jax.configs.study_demo import get_config  # noqa: F401
