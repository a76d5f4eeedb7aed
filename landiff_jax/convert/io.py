"""Reading PyTorch-side checkpoints as `{name: numpy array}` mappings without executing untrusted code.

Checkpoints are read lazily: `load_state_dict` returns a `LazyStateDict` that reads a tensor from the file each
time it is looked up and keeps nothing, so converting a part needs memory for the tensors in use, not the file.

- SAT / PyTorch `.pt` `.pth` `.bin`: `torch.load(weights_only=True, mmap=True)` (torch is a conversion-only
  dependency) with an explicit allowlist of the plain-data globals training checkpoints carry besides their
  tensors (`plain_data_globals`: numpy arrays, dtypes, scalars and RNG state, `argparse.Namespace`, collections);
  any other global is refused, never imported or called. Each tensor is copied out of the memory map when looked
  up and its pages handed back. `{"state_dict": ...}` (VAE) and `{"module": ...}` (SAT / DeepSpeed) wrappers are
  unwrapped; the rest of a DeepSpeed client state (optimizer, RNG state, iteration, args) is left unread.
- `.safetensors`: parsed here; each tensor is read with one file read, bf16 stays bf16 (`ml_dtypes`), no torch.
- A directory: a DeepSpeed / SAT save (`latest` naming the tag folder, or `mp_rank_00_model_states.pt` itself),
  else its `*.safetensors.index.json` (sharded HF layout) or its single `.safetensors` file.
A file that ends early or is damaged is reported as truncated or corrupt, not as unsafe.
"""

import argparse
import collections
from collections.abc import Callable, MutableMapping
import ctypes
import functools
import glob
import json
import mmap
import os
import re
import struct
import sys
from typing import Any, Iterator, Mapping
import zipfile

import ml_dtypes
import numpy as np

from landiff_jax.convert import ConversionError

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
DEEPSPEED_MODEL_FILE = 'mp_rank_00_model_states.pt'
# A safetensors header longer than this is not a header: the file is something else.
_MAX_SAFETENSORS_HEADER = 100 << 20
# torch's legacy (pre-zip) serialisation starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
# What torch's weights-only unpickler says when a pickle needs something outside the allowlist.
_UNSAFE_PICKLE = re.compile(r'Unsupported global|unsupported GLOBAL|Can only (build|create|SETITEM|append|extend)|'
                            r'unrecognized function|is blocked')


class LazyStateDict(MutableMapping):
  """name → numpy array, read from the checkpoint each time a name is looked up (a fresh array, not kept).

  Iterating names, `in` and `len` read nothing; `items()`/`values()` read one tensor per step. Names assigned
  hold their array (tests edit checkpoints this way); deleting a name hides the file's tensor.
  """

  def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]], source: str = ''):
    self._entries: dict[str, Any] = dict(readers)
    self.source = source  # the file it was read from, for messages

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

  Bad files (missing, unknown type, truncated or corrupt, unsafe pickles) are refused here, before any use.
  """
  if not os.path.exists(path):
    raise ConversionError(f'checkpoint {path!r} does not exist; pass the path of the official file or directory.')
  path = resolve_checkpoint(path)
  if os.path.isdir(path):
    readers = {}
    for file in safetensors_files(path):
      readers.update(safetensors_readers(file))
    return LazyStateDict(readers, source=path)
  if path.endswith('.safetensors'):
    return LazyStateDict(safetensors_readers(path), source=path)
  if path.endswith(_TORCH_SUFFIXES):
    return load_torch_checkpoint(path)
  raise ConversionError(f'checkpoint {path!r}: unknown file type; expected a .safetensors file, a PyTorch '
                        f'{"/".join(_TORCH_SUFFIXES)} file or a directory of safetensors shards.')


def resolve_checkpoint(path: str) -> str:
  """The file a SAT / DeepSpeed save directory stands for: `DIR/latest` names the tag folder holding
  `mp_rank_00_model_states.pt` (as SAT's `load_checkpoint` reads it); other paths are returned unchanged."""
  if not os.path.isdir(path):
    return path
  latest = os.path.join(path, 'latest')
  if os.path.isfile(latest) and not os.path.isfile(os.path.join(path, DEEPSPEED_MODEL_FILE)):
    with open(latest) as f:
      tag = f.read().strip()
    folder = os.path.join(path, tag)
    if not tag or not os.path.isdir(folder):
      raise ConversionError(f'{latest} names the checkpoint {tag!r}, but {folder} is not a directory; pass the '
                            f'folder holding {DEEPSPEED_MODEL_FILE} as --src.')
    path = folder
  ranks = sorted(glob.glob(os.path.join(path, 'mp_rank_*_model_states.pt')))
  if not ranks:
    return path
  if len(ranks) > 1:
    raise ConversionError(f'{path} is split over {len(ranks)} model-parallel ranks ({", ".join(map(os.path.basename, ranks))}'
                          f'); landiff-jax reads one {DEEPSPEED_MODEL_FILE} (the release is saved with one rank): '
                          'merge the ranks with SAT first.')
  return ranks[0]


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
  file_size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ConversionError(f'{path} is truncated or not a safetensors file ({file_size} bytes, shorter than the '
                            '8-byte header length). Download it again.')
    (header_len,) = struct.unpack('<Q', prefix)
    if header_len > _MAX_SAFETENSORS_HEADER:
      raise ConversionError(f'{path} is not a safetensors file (its first 8 bytes give a header of {header_len} '
                            'bytes).')
    if header_len > file_size - 8:
      raise ConversionError(f'{path} is truncated or corrupt: its header needs {8 + header_len} bytes but the file '
                            f'has {file_size}. Download it again.')
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise ConversionError(f'{path} is not a safetensors file, or is corrupt (bad header: {e}).') from None
  if not isinstance(header, dict):
    raise ConversionError(f'{path} is not a safetensors file (its header is not a JSON object).')
  return header, 8 + header_len


def safetensors_readers(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """name → function reading that tensor from the file; every entry is checked against the file size first."""
  header, data_start = read_safetensors_header(path)
  file_size = os.path.getsize(path)
  readers = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype_name, (begin, end), shape = entry['dtype'], entry['data_offsets'], [int(n) for n in entry['shape']]
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f'{path} is corrupt: the header entry of {name!r} is {entry!r}. Download it '
                            'again.') from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
      raise ConversionError(f'{path}: tensor {name!r} has unsupported dtype {dtype_name}.')
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != expected or data_start + end > file_size:
      raise ConversionError(f'{path} is truncated or corrupt: tensor {name!r} ({entry["dtype"]} {entry["shape"]}) '
                            f'needs bytes [{data_start + begin}, {data_start + end}) but the file has '
                            f'{file_size}. Download it again.')
    readers[name] = functools.partial(_read_safetensor, path, data_start + begin, end - begin, dtype, tuple(shape))
  return readers


def _read_safetensor(path: str, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
  data = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
  if data.size != nbytes:
    raise ConversionError(f'{path} is truncated: it ended while reading bytes [{offset}, {offset + nbytes}).')
  return data.view(dtype).reshape(shape)


def load_torch_checkpoint(path: str) -> LazyStateDict:
  """Tensors of a PyTorch pickle loaded with `weights_only=True` and the plain-data allowlist; a pickle that needs
  anything else is refused, not executed, and a damaged file is reported as truncated or corrupt.

  The file is memory-mapped (`mmap=True`): a tensor is copied out when looked up and the pages it occupied are
  then handed back to the OS, so reading the whole file one tensor at a time never holds it all resident. (Files
  in torch's legacy pre-zip format cannot be mapped; they are read whole.)"""
  try:
    import torch
  except ImportError:
    raise ConversionError(f'reading {path} needs torch (a conversion-only dependency): '
                          'pip install torch==2.13.0') from None
  zip_format = zipfile.is_zipfile(path)
  if not zip_format:
    with open(path, 'rb') as f:
      head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head != _LEGACY_TORCH_MAGIC:
      kind = 'cut short or damaged' if head.startswith(b'PK') else 'not a PyTorch checkpoint'
      raise ConversionError(f'{path} is truncated or corrupt ({kind}: no readable zip archive, '
                            f'{os.path.getsize(path)} bytes). Download or copy it again.')
  try:
    with torch.serialization.safe_globals(plain_data_globals()):
      payload = torch.load(path, map_location='cpu', weights_only=True, mmap=zip_format)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
    reason = ' '.join(str(e).split())
    if _UNSAFE_PICKLE.search(reason):
      raise ConversionError(
          f'refusing to load {path}: it is not a plain tensor checkpoint that can be read without executing code '
          f'({_unsafe_global(reason)}). If you trust the file, re-save only its weights (torch.save({{"module": '
          'state_dict}, ...)) and convert that.', details=reason) from None
    what = f'{type(e).__name__}: {reason[:200]}' if reason else type(e).__name__
    raise ConversionError(f'{path} is truncated or corrupt ({what}). Download or copy it again.',
                          details=reason) from None
  state_dict = unwrap_state_dict(payload, path)
  tensors = {name: tensor for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}
  if not tensors:
    raise ConversionError(f'{path} holds no tensors where its weights should be (keys: '
                          f'{", ".join(map(str, list(state_dict)[:8]))}); pass the model checkpoint.')
  return LazyStateDict({name: functools.partial(_read_mapped_tensor, tensor) for name, tensor in tensors.items()},
                       source=path)


def _unsafe_global(reason: str) -> str:
  found = re.search(r'GLOBAL (\S+)', reason) or re.search(r'but got (<class [^>]+>|\S+)', reason)
  return f'it needs {found.group(1)}, which is not plain data' if found else reason[:200]


def _plain_record_dict(default_factory: Any = None, *args: Any) -> dict:
  """`collections.defaultdict` read as a plain dict (its items follow; the factory, a builtin type, is dropped)."""
  del default_factory, args
  return {}


@functools.cache
def plain_data_globals() -> list[Any]:
  """The globals a SAT / DeepSpeed training checkpoint may name besides tensors, each a constructor of plain data
  (for `torch.serialization.safe_globals`; tensors, storages, `torch.Size`, `OrderedDict` are torch's own
  weights-only allowlist). Names are given explicitly where numpy 1.x (`numpy.core`) and 2.x (`numpy._core`)
  pickles differ, so nothing is imported by name from the file."""
  import numpy.random._pickle as rng_pickle
  import numpy.random.bit_generator as bit_generator
  multiarray = (getattr(np, '_core', None) or np.core).multiarray  # numpy 2.x, else 1.x
  allowed: list[Any] = [argparse.Namespace, collections.OrderedDict, collections.Counter, collections.deque,
                        np.ndarray, np.dtype, np.random.RandomState, np.random.Generator, bit_generator.SeedSequence,
                        rng_pickle.__randomstate_ctor, rng_pickle.__bit_generator_ctor, rng_pickle.__generator_ctor,
                        (_plain_record_dict, 'collections.defaultdict')]
  for name in ('_reconstruct', 'scalar'):
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
      allowed.append((getattr(multiarray, name), f'{module}.{name}'))
  allowed += [np.random.MT19937, np.random.PCG64, np.random.PCG64DXSM, np.random.Philox, np.random.SFC64]
  unpickle_seed = getattr(bit_generator, '__pyx_unpickle_SeedSequence', None)
  if unpickle_seed is not None:
    allowed.append(unpickle_seed)
  dtypes_module = getattr(np, 'dtypes', None)  # numpy >= 1.25: the classes of dtype instances
  dtype_classes = vars(dtypes_module).values() if dtypes_module is not None else []
  allowed += [cls for cls in dtype_classes if isinstance(cls, type) and issubclass(cls, np.dtype)]
  # builtin types a defaultdict names as its factory, and containers pickled by reduction
  allowed += [(cls, f'builtins.{cls.__name__}') for cls in (list, dict, tuple, frozenset, int, float, str, bool,
                                                             bytes, slice)]
  return allowed


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
