"""Reading PyTorch-side checkpoints into `{name: numpy array}` without executing untrusted code.

- SAT / PyTorch `.pt` `.pth` `.bin`: `torch.load(weights_only=True)` (torch is a conversion-only dependency);
  `{"state_dict": ...}` (VAE) and `{"module": ...}` (SAT / DeepSpeed) wrappers are unwrapped.
- `.safetensors`: parsed here with numpy memory maps, so tensors are read lazily one at a time and bf16 stays
  bf16 (`ml_dtypes`), with no torch needed.
- A directory: its `*.safetensors.index.json` (sharded HF layout) or its single `.safetensors` file.
"""

import argparse
import glob
import json
import os
import struct
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


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint file or directory as numpy arrays (safetensors ones memory-mapped)."""
  return dict(iter_tensors(path))


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) pairs; for safetensors each array is read only when used."""
  if not os.path.exists(path):
    raise ConversionError(f'checkpoint {path!r} does not exist; pass the path of the official file or directory.')
  if os.path.isdir(path):
    for file in safetensors_files(path):
      yield from iter_safetensors(file)
  elif path.endswith('.safetensors'):
    yield from iter_safetensors(path)
  elif path.endswith(_TORCH_SUFFIXES):
    yield from load_torch_checkpoint(path).items()
  else:
    raise ConversionError(f'checkpoint {path!r}: unknown file type; expected a .safetensors file, a PyTorch '
                          f'{"/".join(_TORCH_SUFFIXES)} file or a directory of safetensors shards.')


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


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  header, data_start = read_safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode='r')
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry['dtype'])
    if dtype is None:
      raise ConversionError(f'{path}: tensor {name!r} has unsupported dtype {entry["dtype"]}.')
    begin, end = entry['data_offsets']
    expected = int(np.prod(entry['shape'], dtype=np.int64)) * np.dtype(dtype).itemsize
    if end - begin != expected or data_start + end > data.shape[0]:
      raise ConversionError(f'{path} is truncated or corrupt: tensor {name!r} ({entry["dtype"]} {entry["shape"]}) '
                            f'needs bytes [{data_start + begin}, {data_start + end}) but the file has '
                            f'{data.shape[0]}. Download it again.')
    yield name, data[data_start + begin:data_start + end].view(dtype).reshape(entry['shape'])


def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Tensors of a PyTorch pickle loaded with `weights_only=True`; unsafe pickles are refused, not executed."""
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
  return {name: torch_to_numpy(tensor) for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}


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


def torch_to_numpy(tensor) -> np.ndarray:
  import torch
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
