"""Converting the official PyTorch release (SAT `.pt`, safetensors, HF layouts) into landiff-jax parameters.

`io` reads checkpoint files into `{name: numpy array}` safely; one module per model maps names and layouts.
Converters know nothing about sampling; model directories are written by `landiff_jax.checkpoints`.
"""


class ConversionError(ValueError):
  """A checkpoint that cannot be converted: the message names the file or keys and what to do."""
