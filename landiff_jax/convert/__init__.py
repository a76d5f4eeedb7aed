"""Converting the official PyTorch release (SAT `.pt`, safetensors, HF layouts) into landiff-jax parameters.

`io` reads checkpoint files into `{name: numpy array}` safely; one module per model maps names and layouts.
Converters know nothing about sampling; model directories are written by `landiff_jax.checkpoints`.

Each converter follows the release's own loader for its file (reference landiff-official.md §1): where the release
loads with `strict=False` (DiT, VAE, HF T5 / ViT), tensors the model has no place for are ignored and listed in one
notice; where it is strict (the tokenizer VQ, the LM), they are refused. Notices go through `notice`: to the
handler of the innermost `notices()` block, else to the `landiff_jax.convert` logger.
"""

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import logging


class ConversionError(ValueError):
  """A checkpoint that cannot be converted: the message is one line naming the file, key or config field and what
  to do; `details` (shown with `--verbose`) holds the full lists behind it."""

  def __init__(self, message: str, details: str = ''):
    super().__init__(message)
    self.details = details


_HANDLER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar('landiff_convert_notices',
                                                                                       default=None)


def notice(message: str) -> None:
  """Reports one line about something the conversion did on its own (keys ignored, a buffer dropped, a copy
  preferred over another): nothing to fix, but the user should know."""
  handler = _HANDLER.get()
  if handler is None:
    logging.getLogger(__name__).warning(message)
  else:
    handler(message)


@contextlib.contextmanager
def notices(handler: Callable[[str], None] | None = None) -> Iterator[list[str]]:
  """Within the block, notices go to `handler` (default: the list this yields)."""
  collected: list[str] = []
  token = _HANDLER.set(handler or collected.append)
  try:
    yield collected
  finally:
    _HANDLER.reset(token)
