"""Tokenizer stage training: encoder, decoder and quantizer projections learn; the codebook follows by EMA.

    landiff-jax train tokenizer --config=configs/train_tokenizer.py \
        --config.train.data_dir=data/theia-features --config.train.workdir=runs/tokenizer

`--config=configs/train_tokenizer.py:tiny` gives the same stage at toy sizes.
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
    raise ValueError(f'train_tokenizer takes no size or "tiny", not {size!r}.')
  config = _load('tiny' if size == 'tiny' else 'landiff_official')
  config.name = f'train_tokenizer{"_tiny" if size else ""}'
  # the codebook and its EMA statistics learn by EMA (TokenizerTask.update_frozen), not by the optimizer
  config.train.frozen = ['quantizer/codebook', '^quantizer_ema/']
  return config
