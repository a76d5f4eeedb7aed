"""landiff-jax: a JAX/Flax reimplementation of LanDiff (text → semantic tokens → video)."""

__version__ = '0.1.0'
