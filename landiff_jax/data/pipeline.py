"""grain input pipeline shared by every training stage: shuffle, repeat, shard by process, batch."""

from __future__ import annotations

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


def make_batch_iterator(source: Any, batch_size: int, *, seed: int, shuffle: bool,
                        process_index: int | None = None, process_count: int | None = None,
                        drop_remainder: bool = True,
                        read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """An endless iterator of this process's share of each global batch.

  `source` is a `grain.MapDataset` (or any random-access sequence) of example dicts of numpy arrays.
  The global example stream is shuffled anew every epoch (the seed and the epoch pick the order), then
  process p reads elements p, p + P, p + 2P, ...; batch i of every process together is global batch i.
  The iterator's `get_state()` / `set_state()` is its position (the global batch index, the same on every
  process), which the checkpoint stores. `read_options` defaults to a few reader threads and a short prefetch
  queue of whole batches (grain's default of 500 queued batches is too much memory for video).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  local_batch = per_process_batch_size(batch_size, process_count)
  dataset = as_map_dataset(source)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat()  # shuffling below a repeat draws a new order per epoch
  dataset = dataset[process_index::process_count]
  dataset = dataset.batch(local_batch, drop_remainder=drop_remainder)
  return iter(dataset.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))
