"""Random-access sources of training examples stored as files."""

from __future__ import annotations

from collections.abc import Sequence
import glob
import os
import threading

import numpy as np

# numpy parses each .npy header with ast.literal_eval, and CPython 3.11's parser is not thread-safe: grain's reader
# threads parsing at once raise 'SystemError: AST constructor recursion depth mismatch'. One file read at a time.
_READ_LOCK = threading.Lock()


class NpzDirectory:
  """One example per `.npz` file in a directory (sorted by name), read lazily: a grain random-access source.

  `keys` are the arrays every example must hold; a file missing one is reported with its name when read.
  Write examples with `np.savez(path, **arrays)`; e.g. the diffusion stage expects `latents` [T, h, w, 16]
  (scaled VAE latents), `text` [226, 4096] (T5 features) and `features` [T, h/2, w/2, 768] (tokenizer-decoder
  features).
  """

  def __init__(self, directory: str, keys: Sequence[str]):
    if not os.path.isdir(directory):
      raise FileNotFoundError(f'training data directory {directory!r} does not exist; set train.data_dir to a '
                              f'directory of .npz examples.')
    self.files = sorted(glob.glob(os.path.join(directory, '*.npz')))
    if not self.files:
      raise FileNotFoundError(f'{directory!r} holds no .npz examples; write one file per example with '
                              f'np.savez(path, {", ".join(f"{k}=..." for k in keys)}).')
    self.keys = tuple(keys)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self.files[index]
    with _READ_LOCK, np.load(path, allow_pickle=False) as data:
      missing = [k for k in self.keys if k not in data.files]
      if missing:
        raise KeyError(f'{path} lacks {missing}; every example needs {list(self.keys)} (it has {data.files}).')
      return {k: np.asarray(data[k]) for k in self.keys}
