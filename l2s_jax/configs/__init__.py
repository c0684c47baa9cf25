"""Configs that ship with the package (found by an installed, non-editable l2s_jax too).

demo   the default job's systems: configs/demo.py:<which> (l2s_jax.demo)
"""
