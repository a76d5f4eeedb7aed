"""Training metrics: JSON lines (`metrics.jsonl`), TensorBoard scalars and a progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import tqdm

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
  """The scalar entries of a host-side metrics dict as Python numbers; arrays with more elements are dropped."""
  scalars = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.size == 1:
      scalars[name] = value.item()
  return scalars


def drop_records_after(path: str, step: int) -> None:
  """Removes records of steps > `step` from a metrics file: a resumed run logs those steps again."""
  if not os.path.isfile(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  os.replace(tmp, path)


def _summary_writer(logdir: str) -> Any:
  """A tensorboardX SummaryWriter, imported here rather than with this module (exporting and sampling never log).

  tensorboardX imports torch at its own import time when torch is installed (about 3 s on CPU), only to recognise
  torch tensors among the values it is given; ours are Python floats, so the import of torch is refused while
  tensorboardX loads, unless torch is already loaded. Anything importing torch later gets it as usual.
  """
  refuse_torch = 'torch' not in sys.modules and 'tensorboardX' not in sys.modules
  if refuse_torch:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if refuse_torch:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter(logdir)


class MetricsWriter:
  """Writes one record per logged step. Only the writing process (process 0) touches files.

  Records after `initial_step` (left by a run that crashed after its last checkpoint) are dropped on open.
  """

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int, progress: bool, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      metrics_path = os.path.join(workdir, METRICS_FILE)
      drop_records_after(metrics_path, initial_step)
      self._jsonl = open(metrics_path, 'a', encoding='utf-8')
      self._tensorboard = _summary_writer(os.path.join(workdir, TENSORBOARD_DIR))
    show_bar = enabled and progress and sys.stderr.isatty()
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not show_bar, unit='step',
                          dynamic_ncols=True)

  def advance(self, steps: int = 1) -> None:
    self._bar.update(steps)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f'train/{name}', value, step)
    self._bar.set_postfix(loss=f'{scalars.get("loss", float("nan")):.4g}', refresh=False)

  def close(self) -> None:
    self._bar.close()
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
