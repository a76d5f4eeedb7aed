"""Reading PyTorch-side checkpoints as `{name: numpy array}` mappings without executing untrusted code.

Checkpoints are read lazily: `load_state_dict` returns a `LazyStateDict` that reads a tensor from the file each
time it is looked up and keeps nothing, so converting a part needs memory for the tensors in use, not the file.

- SAT / PyTorch `.pt` `.pth` `.bin`: `torch.load(weights_only=True, mmap=True)` (torch is a conversion-only
  dependency); each tensor is copied out of the memory map when looked up and its pages handed back.
  `{"state_dict": ...}` (VAE) and `{"module": ...}` (SAT / DeepSpeed) wrappers are unwrapped.
- `.safetensors`: parsed here; each tensor is read with one file read, bf16 stays bf16 (`ml_dtypes`), no torch.
- A directory: its `*.safetensors.index.json` (sharded HF layout) or its single `.safetensors` file.
"""

import argparse
from collections.abc import Callable, MutableMapping
import ctypes
import functools
import glob
import json
import mmap
import os
import struct
import sys
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from landiff_jax.convert import ConversionError

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
# Plain containers some SAT / DeepSpeed checkpoints hold next to the weights; nothing executable.
_SAFE_TORCH_GLOBALS = (argparse.Namespace,)


class LazyStateDict(MutableMapping):
  """name → numpy array, read from the checkpoint each time a name is looked up (a fresh array, not kept).

  Iterating names, `in` and `len` read nothing; `items()`/`values()` read one tensor per step. Names assigned
  hold their array (tests edit checkpoints this way); deleting a name hides the file's tensor.
  """

  def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]]):
    self._entries: dict[str, Any] = dict(readers)

  def __getitem__(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    return entry if isinstance(entry, np.ndarray) else entry()

  def __setitem__(self, name: str, value: np.ndarray) -> None:
    self._entries[name] = np.asarray(value)

  def __delitem__(self, name: str) -> None:
    del self._entries[name]

  def __contains__(self, name: object) -> bool:  # without reading the tensor
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'LazyStateDict({len(self)} tensors)'


def load_state_dict(path: str) -> LazyStateDict:
  """Every tensor of a checkpoint file or directory, each read only when looked up (see `LazyStateDict`).

  Bad files (missing, unknown type, truncated safetensors, unsafe pickles) are refused here, before any use.
  """
  if not os.path.exists(path):
    raise ConversionError(f'checkpoint {path!r} does not exist; pass the path of the official file or directory.')
  if os.path.isdir(path):
    readers = {}
    for file in safetensors_files(path):
      readers.update(safetensors_readers(file))
    return LazyStateDict(readers)
  if path.endswith('.safetensors'):
    return LazyStateDict(safetensors_readers(path))
  if path.endswith(_TORCH_SUFFIXES):
    return load_torch_checkpoint(path)
  raise ConversionError(f'checkpoint {path!r}: unknown file type; expected a .safetensors file, a PyTorch '
                        f'{"/".join(_TORCH_SUFFIXES)} file or a directory of safetensors shards.')


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) pairs, each array read as the iteration reaches it."""
  yield from load_state_dict(path).items()


def safetensors_files(directory: str) -> list[str]:
  """The shards named by the directory's index json, or its single .safetensors file."""
  indexes = sorted(glob.glob(os.path.join(directory, '*.safetensors.index.json')))
  if len(indexes) > 1:
    raise ConversionError(f'{directory} holds several index files ({", ".join(map(os.path.basename, indexes))}); '
                          'point --src at one model directory.')
  if indexes:
    with open(indexes[0]) as f:
      weight_map = json.load(f).get('weight_map', {})
    files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ConversionError(f'{indexes[0]} names shards that are missing: {", ".join(missing)}.')
    return files
  files = sorted(glob.glob(os.path.join(directory, '*.safetensors')))
  if len(files) != 1:
    raise ConversionError(f'{directory} has {len(files)} .safetensors files and no index json; expected one file '
                          'or a sharded checkpoint with its *.safetensors.index.json.')
  return files


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """(header dict, byte offset of the data section)."""
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ConversionError(f'{path} is not a safetensors file (shorter than its 8-byte header length).')
    (header_len,) = struct.unpack('<Q', prefix)
    if header_len > os.path.getsize(path) - 8:
      raise ConversionError(f'{path} is not a safetensors file (header length {header_len} exceeds the file).')
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ConversionError(f'{path} is not a safetensors file (bad header: {e}).') from None
  return header, 8 + header_len


def safetensors_readers(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """name → function reading that tensor from the file; every entry is checked against the file size first."""
  header, data_start = read_safetensors_header(path)
  file_size = os.path.getsize(path)
  readers = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry['dtype'])
    if dtype is None:
      raise ConversionError(f'{path}: tensor {name!r} has unsupported dtype {entry["dtype"]}.')
    begin, end = entry['data_offsets']
    expected = int(np.prod(entry['shape'], dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != expected or data_start + end > file_size:
      raise ConversionError(f'{path} is truncated or corrupt: tensor {name!r} ({entry["dtype"]} {entry["shape"]}) '
                            f'needs bytes [{data_start + begin}, {data_start + end}) but the file has '
                            f'{file_size}. Download it again.')
    readers[name] = functools.partial(_read_safetensor, path, data_start + begin, end - begin, dtype,
                                      tuple(entry['shape']))
  return readers


def _read_safetensor(path: str, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
  data = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
  if data.size != nbytes:
    raise ConversionError(f'{path} is truncated: it ended while reading bytes [{offset}, {offset + nbytes}).')
  return data.view(dtype).reshape(shape)


def load_torch_checkpoint(path: str) -> LazyStateDict:
  """Tensors of a PyTorch pickle loaded with `weights_only=True`; unsafe pickles are refused, not executed.

  The file is memory-mapped (`mmap=True`): a tensor is copied out when looked up and the pages it occupied are
  then handed back to the OS, so reading the whole file one tensor at a time never holds it all resident."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f'reading {path} needs torch (a conversion-only dependency): '
                          'pip install torch==2.13.0') from None
  try:
    with torch.serialization.safe_globals(list(_SAFE_TORCH_GLOBALS)):
      payload = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
  except Exception as e:  # torch raises UnpicklingError or RuntimeError subclasses depending on the content
    raise ConversionError(f'refusing to load {path}: it is not a plain tensor checkpoint that can be read '
                          f'without executing code ({type(e).__name__}: {str(e).splitlines()[0]}).') from None
  state_dict = unwrap_state_dict(payload, path)
  return LazyStateDict({name: functools.partial(_read_mapped_tensor, tensor)
                        for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)})


def unwrap_state_dict(payload: Any, path: str) -> Mapping[str, Any]:
  """The name → tensor mapping inside SAT (`module`), Lightning/VAE (`state_dict`) or plain checkpoints."""
  node = payload
  for _ in range(3):
    if not isinstance(node, Mapping):
      break
    for key in ('state_dict', 'module', 'model'):
      if isinstance(node.get(key), Mapping):
        node = node[key]
        break
    else:
      break
  if not isinstance(node, Mapping) or not node:
    raise ConversionError(f'{path} holds no state dict (top-level {type(payload).__name__}).')
  return node


def _read_mapped_tensor(tensor) -> np.ndarray:
  """A numpy copy of a tensor of a memory-mapped checkpoint; the mapped pages it read are released after."""
  array = np.array(torch_to_numpy(tensor), copy=True)
  _release_pages(tensor.untyped_storage())
  return array


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages (file pages are re-read on next use; contents never change)


@functools.cache
def _madvise():
  if not sys.platform.startswith('linux'):
    return None
  try:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
  except (OSError, AttributeError):
    return None
  madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  return madvise


def _release_pages(storage) -> None:
  """Asks the OS to drop the whole pages of `storage` from this process's resident memory (a hint; a no-op where
  unsupported). Touched pages of a file mapping otherwise count as resident until the mapping is closed."""
  madvise = _madvise()
  start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
  start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
  end = end // mmap.PAGESIZE * mmap.PAGESIZE
  if madvise is not None and end > start:
    madvise(start, end - start, _MADV_PAGEOUT)


def torch_to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
