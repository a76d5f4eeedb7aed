"""Training configs, one per stage: `--config=configs/train.py:STAGE` (full size), `:STAGE,tiny` (toy sizes) or
`:STAGE,demo` (the built-in demo, `configs/shapes_demo.py`, with that stage's settings from its `STAGES`).

    landiff-jax train tokenizer --config=configs/train.py:tokenizer \
        --config.train.data_dir=data/theia-features --config.train.workdir=runs/tokenizer
    landiff-jax train lm --config=configs/train.py:lm \
        --config.train.data_dir=data/lm-tokens --config.train.workdir=runs/lm
    landiff-jax train diffusion --config=configs/train.py:diffusion --config.train.init_from=models/landiff-dit \
        --config.train.data_dir=data/diffusion --config.train.workdir=runs/diffusion
"""

import importlib.util
import os

# What each stage does not train with the optimizer (regexes on '/'-joined parameter paths).
FROZEN = {
    # the codebook and its EMA statistics learn by EMA (TokenizerTask.update_frozen)
    'tokenizer': ['quantizer/codebook', '^quantizer_ema/'],
    'lm': [],
    # the CogVideoX-2B backbone: no gradients, no optimizer state
    'diffusion': ['^params/dit/'],
    # a CogVideoX-architecture VAE trained whole (the demo's)
    'vae': [],
    # the renderer's backbone trained whole, without control branch (the demo's, before its 'diffusion' stage)
    'backbone': [],
    # a small Theia-architecture ViT and its semantic head, trained whole (the demo's feature extractor)
    'theia': [],
}


# The full-size stages' plans (from `landiff-jax plan --target`, see the README's "Training on many hosts"):
# parameters, gradients and optimizer state split over every device by FSDP, no tensor parallelism (it does not
# pay at 0.1-2 B parameters, and the LM's 2,055-entry vocabulary does not split), activations rematerialised per
# block, attention by `attention_backend` (set by each stage's plan where its sequences are long: 'auto' picks the
# fused kernel on GPU/TPU, the blockwise path on CPU, never the 17,776² score matrices of 'xla').
# Past 64 devices give 'data' the rest, e.g. --config.parallel.mesh.data=4 --config.parallel.mesh.fsdp=64 (the
# renderer's hidden size 1,920 caps fsdp at 128). The VAE rematerialises each temporal chunk and each ResnetBlock3D,
# runs untiled and splits each clip's rows over 4 devices: one 49-frame 480x720 clip on one device plans at 118.5 GiB
# (1,939 GiB without remat), over 4 devices at 28.4 GiB each (README, "Training on many hosts"); for 17x256x256 crops
# data parallelism is cheaper (--config.parallel.mesh.tensor=1). Theia's ViT fits without remat.
FSDP = dict(data=1, fsdp=-1, tensor=1)
PLANS = {
    'tokenizer': dict(mesh=FSDP, remat_policy='nothing_saveable'),
    'lm': dict(mesh=FSDP, remat_policy='nothing_saveable'),
    'diffusion': dict(mesh=FSDP, remat_policy='nothing_saveable'),
    'backbone': dict(mesh=FSDP, remat_policy='nothing_saveable'),
    'theia': dict(mesh=FSDP, remat_policy='none'),
    # context parallelism: each clip's rows split 4 ways ('act_height' -> 'tensor'; 480 / 8 / 4 = 15 latent rows per
    # device), kernels whole on every device
    'vae': dict(mesh=dict(data=1, fsdp=-1, tensor=4), remat_policy='nothing_saveable'),
}


SIZES = {'': 'landiff_official', 'tiny': 'tiny', 'demo': 'shapes_demo'}


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_landiff_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg):
  stage, _, size = (arg or '').partition(',')
  # a stage may be one phase of a task's training, named TASK_PHASE (the demo's 'vae_frames' trains the 'vae' task)
  task = stage.partition('_')[0]
  if task not in FROZEN or size not in SIZES:
    raise ValueError(f'use configs/train.py:STAGE, :STAGE,tiny or :STAGE,demo with STAGE one of {sorted(FROZEN)}; '
                     f'got {arg!r}.')
  module = _load(SIZES[size])
  stages = getattr(module, 'STAGES', {})
  if stage != task and stage not in stages:
    raise ValueError(f'{stage!r} is not a training phase of configs/{SIZES[size]}.py; its STAGES are '
                     f'{sorted(stages)}.')
  config = module.get_config()
  config.name = f'train_{stage}{"_" + size if size else ""}'
  config.train.frozen = list(FROZEN[task])
  if stage in stages:
    settings = stages[stage]
    config.train.update(settings.get('train', {}))
    for path, value in settings.get('overrides', {}).items():
      section, key = path.split('.')
      config[section][key] = value
  if not size and stage in PLANS:
    plan = PLANS[stage]
    config.parallel.mesh.update(plan['mesh'])
    for key in ('remat_policy', 'attention_backend'):
      if key in plan:
        config[key] = plan[key]
  return config
