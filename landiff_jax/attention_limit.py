"""The attention scores limit in force: how many GiB of L×L scores an explicitly chosen attention backend may hold.

Entry points set it from `config.attention_max_scores_gib` with `scores_limit(...)` around the work they trace
(`cli.main` does it for every command); `nn.attention.attention` reads it when it is traced. It lives in a module
without JAX so the command line can set it before importing anything heavy.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

# The limit outside any `scores_limit` block: the default of config.attention_max_scores_gib.
DEFAULT_MAX_SCORES_GIB = 4.0

_limit: contextvars.ContextVar[float | None] = contextvars.ContextVar('attention_max_scores_gib',
                                                                      default=DEFAULT_MAX_SCORES_GIB)


def scores_limit(gib: float | None) -> contextlib.AbstractContextManager[None]:
  """A context within which explicit backends that would hold more than `gib` GiB of scores (or of a dense mask)
  in one call are refused; None or inf lifts the limit. Raises ValueError for a negative or non-numeric `gib`
  at once. The limit is read when a function is traced: a function jitted and traced before the block keeps the
  limit it was traced with."""
  if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or math.isnan(gib) or gib < 0):
    raise ValueError(f'attention_max_scores_gib must be a non-negative number of GiB (inf: no limit), got {gib!r}.')
  return _limited(None if gib is None or math.isinf(gib) else float(gib))


@contextlib.contextmanager
def _limited(gib: float | None) -> Iterator[None]:
  token = _limit.set(gib)
  try:
    yield
  finally:
    _limit.reset(token)


def max_scores_gib() -> float | None:
  """The limit in force here, in GiB (None: no limit)."""
  return _limit.get()
