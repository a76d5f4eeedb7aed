"""grain data sources and the input pipeline."""

from landiff_jax.data.pipeline import make_batch_iterator, per_process_batch_size

__all__ = ['make_batch_iterator', 'per_process_batch_size']
