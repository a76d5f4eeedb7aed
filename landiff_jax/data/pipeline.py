"""grain input pipeline shared by every training stage: shuffle, repeat, shard by process, batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax

DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


def per_process_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'the global batch size {batch_size} must be a positive multiple of the process count '
                     f'{process_count}; set train.batch_size to a multiple of {process_count}.')
  return batch_size // process_count


def as_map_dataset(source: Any) -> grain.MapDataset:
  dataset = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  if len(dataset) == 0:
    raise ValueError('the training dataset is empty; check the data source the task builds.')
  return dataset


class _RowsOfEachBatch:
  """Element k of the selection: row `rows[k % len(rows)]` of global batch `k // len(rows)` of `stream`."""

  def __init__(self, stream: grain.MapDataset, batch_size: int, rows: Sequence[int]):
    self.stream, self.batch_size, self.rows = stream, batch_size, tuple(rows)

  def __call__(self, k: int) -> Any:
    batch, row = divmod(k, len(self.rows))
    return self.stream[batch * self.batch_size + self.rows[row]]


def select_rows(stream: grain.MapDataset, batch_size: int, rows: Sequence[int]) -> grain.MapDataset:
  """The elements of the (endless) `stream` that are rows `rows` of each of its `batch_size`-element batches."""
  rows = list(rows)
  if not rows or sorted(set(rows)) != rows or rows[0] < 0 or rows[-1] >= batch_size:
    raise ValueError(f'rows {rows} must be distinct ascending row indices of a global batch of {batch_size}.')
  stride = rows[1] - rows[0] if len(rows) > 1 else batch_size
  if rows == list(range(rows[0], batch_size, stride)) and stride * len(rows) == batch_size:
    return stream[rows[0]::stride]  # an evenly spaced share (one process: every row)
  return grain.MapDataset.range(len(stream) // batch_size * len(rows)).map(
      _RowsOfEachBatch(stream, batch_size, rows))


def make_batch_iterator(source: Any, batch_size: int, *, seed: int, shuffle: bool,
                        process_index: int | None = None, process_count: int | None = None,
                        rows: Sequence[int] | None = None, drop_remainder: bool = True,
                        read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """An endless iterator of this process's share of each global batch.

  `source` is a `grain.MapDataset` (or any random-access sequence) of example dicts of numpy arrays.
  The global example stream is shuffled anew every epoch (the seed and the epoch pick the order) and cut into
  global batches of `batch_size`. This process reads `rows` of each global batch (ascending indices into it);
  by default process p of P reads rows p, p + P, p + 2P, ... (elements p, p + P, ... of the stream). The
  training loop passes the rows its devices hold in the batch sharding (`parallel.process_batch_rows`), so the
  global batch is the same on any number of processes. The iterator's `get_state()` / `set_state()` is its
  position (the global batch index, the same on every process), which the checkpoint stores. `read_options`
  defaults to a few reader threads and a short prefetch queue of whole batches (grain's default of 500 queued
  batches is too much memory for video).
  """
  if rows is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    per_process_batch_size(batch_size, process_count)
    rows = range(process_index, batch_size, process_count)
  dataset = as_map_dataset(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat()  # shuffling below a repeat draws a new order per epoch
  dataset = select_rows(dataset, batch_size, rows)
  dataset = dataset.batch(len(rows), drop_remainder=drop_remainder)
  return iter(dataset.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))
