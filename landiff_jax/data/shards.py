"""Sharded example stores for real training data (written by `landiff-jax prepare dataset`, see `ingest.py`).

A store is a directory:

    index.json                 what the store holds: its fields (shape, dtype), its shards and their row counts,
                               the settings it was made with and the videos that were skipped. Written last, so a
                               store without it is unfinished (`prepare dataset` completes it).
    shard-00000.array_record   one record per example (one 49-frame group of one video), readable at random by
    shard-00000.json           grain's ArrayRecordDataSource; the JSON beside a shard marks it finished.

A record is self-describing: a little-endian uint32 header length, a JSON header {"arrays": {name: [dtype, shape,
offset]}, "meta": {...}}, then the arrays' raw bytes (C order). No pickle and no `.npy` header parsing (numpy parses
those with `ast`, which is not thread-safe in CPython 3.11, and grain reads with threads).

Training reads a store through `open_source`: a `grain.MapDataset` of example dicts under the names a task asks for
(e.g. the LM's `text` is the store's `lm_text`), so the grain pipeline (`pipeline.make_batch_iterator`) shuffles it,
gives each process its rows of every global batch and saves its position in the checkpoint, exactly as for `.npz`
directories.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np

INDEX_FILE = 'index.json'
FORMAT = 'landiff-jax-shards'
FORMAT_VERSION = 1
_HEADER = struct.Struct('<I')

# what each training stage reads: its example key → the store's field
STAGE_FIELDS: dict[str, dict[str, str]] = {
    'tokenizer': {'features': 'theia_features'},
    'lm': {'ids': 'ids', 'text': 'lm_text', 'text_length': 'lm_text_length', 'motion_score': 'motion_score'},
    'backbone': {'latents': 'latents', 'text': 'dit_text'},
    'diffusion': {'latents': 'latents', 'text': 'dit_text', 'features': 'semantic_features'},
}
# fields that exist only once a trained tokenizer has been given to `prepare dataset`
TOKENIZER_FIELDS = ('ids', 'semantic_features')


def _array_record() -> Any:
  try:
    from array_record.python import array_record_module
  except ImportError:
    raise ImportError('shard stores need the array_record package (installed with grain on Linux); '
                      '`pip install array-record`.') from None
  return array_record_module


def _dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == 'bfloat16' else np.dtype(name)


def encode_record(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytes:
  """One example as bytes: header then the arrays' raw bytes."""
  entries, chunks, offset = {}, [], 0
  for name, value in arrays.items():
    value = np.asarray(value)  # tobytes() writes C order
    entries[name] = [value.dtype.name, list(value.shape), offset]
    chunks.append(value.tobytes())
    offset += value.nbytes
  header = json.dumps({'arrays': entries, 'meta': dict(meta or {})}, sort_keys=True).encode()
  return _HEADER.pack(len(header)) + header + b''.join(chunks)


def decode_record(record: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays, meta) of `encode_record`'s bytes; arrays are read-only views of `record`."""
  (length,) = _HEADER.unpack_from(record)
  header = json.loads(record[_HEADER.size:_HEADER.size + length])
  start = _HEADER.size + length
  arrays = {}
  for name, (dtype, shape, offset) in header['arrays'].items():
    dtype = _dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    arrays[name] = np.frombuffer(record, dtype, count, start + offset).reshape(shape)
  return arrays, header['meta']


def shard_name(index: int) -> str:
  return f'shard-{index:05d}'


class ShardWriter:
  """Writes shard `index` record by record under a temporary name; `finish(meta)` renames it into place and then
  writes the JSON that marks it finished, so a killed writer leaves at most an unmarked shard that the next run
  writes again. Leaving the block without `finish` removes the temporary file."""

  def __init__(self, directory: str, index: int):
    self.base = os.path.join(directory, shard_name(index))
    self.tmp = f'{self.base}.array_record.tmp-{os.getpid()}'
    self.rows, self.fields = 0, {}
    self.writer = None

  def __enter__(self) -> 'ShardWriter':
    self.writer = _array_record().ArrayRecordWriter(self.tmp, 'group_size:1')
    return self

  def write(self, record: bytes) -> None:
    if not self.rows:
      arrays, _ = decode_record(record)
      self.fields = {k: [v.dtype.name, list(v.shape)] for k, v in arrays.items()}
    self.writer.write(record)
    self.rows += 1

  def finish(self, meta: Mapping[str, Any]) -> dict[str, Any]:
    self.writer.close()
    os.replace(self.tmp, f'{self.base}.array_record')
    meta = dict(meta, file=f'{os.path.basename(self.base)}.array_record', rows=self.rows, fields=self.fields)
    write_json(f'{self.base}.json', meta)
    return meta

  def __exit__(self, *exc: Any) -> None:
    if self.writer is not None and self.writer.is_open():
      self.writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def read_shard(directory: str, index: int, chunk: int = 16) -> Iterator[bytes]:
  """Every record of a shard, in order, `chunk` at a time from disk."""
  reader = _array_record().ArrayRecordReader(os.path.join(directory, f'{shard_name(index)}.array_record'))
  try:
    total = reader.num_records()
    for start in range(0, total, chunk):
      yield from reader.read(start, min(start + chunk, total))
  finally:
    reader.close()


def shard_meta(directory: str, index: int) -> dict[str, Any] | None:
  """The finished-shard JSON, or None when the shard is not finished."""
  path = os.path.join(directory, f'{shard_name(index)}.json')
  if not os.path.isfile(path) or not os.path.isfile(path[:-len('.json')] + '.array_record'):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON atomically, unless `path` already holds it."""
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      try:
        if json.load(f) == json.loads(json.dumps(value)):
          return
      except json.JSONDecodeError:
        pass
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def read_index(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory!r} has no {INDEX_FILE}: its preparation has not finished; run '
                            f'`landiff-jax prepare dataset --dst {directory} ...` again to complete it.')
  with open(path, encoding='utf-8') as f:
    index = json.load(f)
  if index.get('format') != FORMAT:
    raise ValueError(f'{path} is not a {FORMAT} index (format {index.get("format")!r}).')
  return index


def is_store(directory: str) -> bool:
  """Whether `directory` is (or is becoming) a shard store rather than a folder of `.npz` examples."""
  return os.path.isdir(directory) and (os.path.isfile(os.path.join(directory, INDEX_FILE)) or any(
      name.startswith('shard-') for name in os.listdir(directory)))


class _Decode:
  """Record bytes → {example key: array} for the fields a stage reads; floats become float32 (stores may keep them
  in bfloat16 to halve their size)."""

  def __init__(self, fields: Mapping[str, str]):
    self.fields = dict(fields)

  def __call__(self, record: bytes) -> dict[str, np.ndarray]:
    arrays, _ = decode_record(record)
    out = {}
    for key, field in self.fields.items():
      value = arrays[field]
      if np.issubdtype(value.dtype, np.floating) or value.dtype == _dtype('bfloat16'):
        value = value.astype(np.float32)
      out[key] = np.array(value)  # own the memory: the record buffer is not kept alive by the batch
    return out


def open_source(directory: str, fields: Mapping[str, str]) -> grain.MapDataset:
  """The store at `directory` as a random-access `grain.MapDataset` of {key: array} with key ← field of `fields`."""
  index = read_index(directory)
  missing = sorted(set(fields.values()) - set(index['fields']))
  if missing:
    hint = (' (semantic ids and their decoded features: run `landiff-jax prepare dataset` again with a trained '
            'tokenizer in MODELS/tokenizer to add them)' if set(missing) & set(TOKENIZER_FIELDS) else '')
    raise ValueError(f'the shards at {directory!r} lack {", ".join(missing)}{hint}; they hold '
                     f'{", ".join(sorted(index["fields"]))}.')
  paths = [os.path.join(directory, shard['file']) for shard in index['shards'] if shard['rows']]
  if not paths:
    raise ValueError(f'the shards at {directory!r} hold no examples; see the skipped videos in its report.json.')
  _array_record()
  source = grain.sources.ArrayRecordDataSource(paths)
  if len(source) != index['rows']:
    raise ValueError(f'the shards at {directory!r} hold {len(source)} records, its {INDEX_FILE} says '
                     f'{index["rows"]}; a shard was changed after preparation: prepare it again.')
  return grain.MapDataset.source(source).map(_Decode(fields))


def stage_source(data_dir: str, stage: str, example_keys: Sequence[str]) -> Any:
  """The examples of `stage` in `train.data_dir`: a shard store if it is one, else a folder of `.npz` files."""
  if is_store(data_dir):
    fields = STAGE_FIELDS[stage]
    return open_source(data_dir, {key: fields[key] for key in example_keys})
  return npz_source(data_dir, example_keys)


def npz_source(data_dir: str, example_keys: Sequence[str]) -> grain.MapDataset:
  """A folder of `.npz` examples (the demo recipe's) as a random-access dataset."""
  from landiff_jax.data.sources import NpzDirectory
  return grain.MapDataset.source(NpzDirectory(data_dir, example_keys))
