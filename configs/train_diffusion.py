"""Diffusion stage training: the control branch and semantic upsampler learn on a frozen CogVideoX-2B backbone.

    landiff-jax train diffusion --config=configs/train_diffusion.py \
        --config.train.init_from=models/landiff-dit --config.train.data_dir=data/diffusion \
        --config.train.workdir=runs/diffusion

`--config=configs/train_diffusion.py:tiny` gives the same stage at toy sizes.
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
    raise ValueError(f'train_diffusion takes no size or "tiny", not {size!r}.')
  config = _load('tiny' if size == 'tiny' else 'landiff_official')
  config.name = f'train_diffusion{"_tiny" if size else ""}'
  config.train.frozen = ['^params/dit/']  # the backbone: no gradients, no optimizer state
  return config
