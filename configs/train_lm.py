"""LM stage training: next-token prediction of semantic ids after the text and micro-condition prefix.

    landiff-jax train lm --config=configs/train_lm.py \
        --config.train.data_dir=data/lm-tokens --config.train.workdir=runs/lm

`--config=configs/train_lm.py:tiny` gives the same stage at toy sizes.
"""

import importlib.util
import os


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_landiff_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(size=None):
  if size not in (None, '', 'tiny'):
    raise ValueError(f'train_lm takes no size or "tiny", not {size!r}.')
  config = _load('tiny' if size == 'tiny' else 'landiff_official')
  config.name = f'train_lm{"_tiny" if size else ""}'
  config.train.frozen = []
  return config
