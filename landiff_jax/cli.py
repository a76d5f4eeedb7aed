"""The `landiff-jax` command line.

    landiff-jax COMMAND [ARGS] --config=configs/x.py [--config.a.b=VALUE ...]

Each command is a small function registered in `COMMANDS`; heavy imports happen inside the command so that
`--help` stays fast. Config overrides use the ml_collections flag syntax and are validated against the config.
"""

import argparse
import json
import sys

from landiff_jax import __version__
from landiff_jax import config as config_lib

DEFAULT_CONFIG = 'configs/landiff_official.py'


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` tokens from the rest of argv."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    token = argv[i]
    if token.startswith('--config.'):
      body = token[len('--config.'):]
      if '=' not in body:
        if i + 1 >= len(argv):
          raise config_lib.ConfigError(f'{token} needs a value: {token}=VALUE.')
        body = f'{body}={argv[i + 1]}'
        i += 1
      overrides.append(body)
    else:
      rest.append(token)
    i += 1
  return rest, overrides


def add_config_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--config', default=DEFAULT_CONFIG,
                      help='config file (a .py with get_config(), or the name of one in configs/); '
                      'override any field with --config.a.b=VALUE (default: %(default)s)')


def cmd_config(args, config) -> int:
  """Prints the resolved config (after overrides)."""
  if args.json:
    print(config.to_json_best_effort(indent=2))
  else:
    print(config)
  return 0


def cmd_devices(args, config) -> int:
  """Lists the visible devices and the mesh the config's `parallel` section builds on them."""
  import jax

  from landiff_jax import parallel

  parallel.initialize_distributed(config.parallel)
  devices = jax.devices()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {jax.process_count()} process(es), '
        f'{len(devices)} device(s):')
  for device in devices:
    print(f'  {device}')
  mesh = parallel.make_mesh(config.parallel.mesh)
  print('mesh: ' + json.dumps(dict(mesh.shape)))
  return 0


# part → ('module:function' converting {name: array} + the part's config section into params, config section).
CONVERTERS = {
    'vae': ('landiff_jax.convert.vae:convert_vae', 'vae'),
    'dit': ('landiff_jax.convert.dit:convert_dit', ('dit', 'control', 'upsampler')),
    'tokenizer': ('landiff_jax.convert.tokenizer:convert_tokenizer', 'tokenizer'),
    'lm': ('landiff_jax.convert.lm:convert_lm', 'lm'),
    't5_lm': ('landiff_jax.convert.t5:convert_t5', 't5_lm'),  # Flan-T5-XXL (the LM's text encoder)
    't5_dit': ('landiff_jax.convert.t5:convert_t5', 't5_dit'),  # T5-v1.1-XXL (the DiT's text encoder)
}


def cmd_convert(args, config) -> int:
  """Converts one part of the official release into a landiff-jax model directory."""
  import importlib
  import os
  import time

  import jax
  import ml_collections

  from landiff_jax import checkpoints
  from landiff_jax.convert import ConversionError, io

  if os.path.exists(args.dst) and not args.overwrite:
    print(f'landiff-jax: error: {args.dst} already exists; choose another --dst or pass --overwrite.',
          file=sys.stderr)
    return 2
  if args.decoder_only and args.part != 'vae':
    print(f'landiff-jax: error: --decoder-only applies to the vae only, not to {args.part}.', file=sys.stderr)
    return 2
  function_path, section = CONVERTERS[args.part]
  module_name, function_name = function_path.split(':')
  convert_fn = getattr(importlib.import_module(module_name), function_name)
  start = time.perf_counter()
  try:
    state_dict = io.load_state_dict(args.src)
    print(f'read {len(state_dict)} tensors from {args.src}')
    if isinstance(section, tuple):
      part_config = ml_collections.ConfigDict({name: config[name].to_dict() for name in section})
    else:
      part_config = config[section].copy_and_resolve_references()
    options = {}
    if args.base:
      if args.part != 'dit':
        raise ConversionError(f'--base applies to the dit only, not to {args.part}.')
      options['base_state_dict'] = io.load_state_dict(args.base)
      print(f'read {len(options["base_state_dict"])} tensors from {args.base}')
    if args.decoder_only:
      options['decoder_only'] = True
      part_config.with_encoder = False
    params = convert_fn(state_dict, part_config, **options)
    dst = checkpoints.save(args.dst, part=args.part, config=part_config, params=params,
                           overwrite=args.overwrite, source=os.path.abspath(args.src))
  except (ConversionError, checkpoints.CheckpointError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f'wrote {args.part} ({count:,} parameters) to {dst} in {time.perf_counter() - start:.1f} s')
  return 0


def cmd_bench(args, config) -> int:
  """Runs one benchmark and prints its result as JSON (also written to --out)."""
  import importlib

  from landiff_jax.bench import BENCHMARKS

  module_name, function_name = BENCHMARKS[args.name].split(':')
  try:
    result = getattr(importlib.import_module(module_name), function_name)(config, args)
  except ValueError as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  return 0


# stage → 'module:Task class' (constructed with the whole config).
TRAIN_TASKS = {
    'diffusion': 'landiff_jax.train.tasks.diffusion:DiffusionTask',
    'tokenizer': 'landiff_jax.train.tasks.tokenizer:TokenizerTask',
    'lm': 'landiff_jax.train.tasks.lm:LMTask',
}


def cmd_train(args, config) -> int:
  """Trains one stage with the generic loop; resumes from the latest checkpoint in train.workdir."""
  import importlib

  from landiff_jax.train import train

  module_name, class_name = TRAIN_TASKS[args.stage].split(':')
  try:
    task = getattr(importlib.import_module(module_name), class_name)(config)
    state = train(task, config.train, config.parallel, config=config.to_dict())
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(f'trained {args.stage} to step {int(state.step)}; checkpoints and metrics in {config.train.workdir}')
  return 0


COMMANDS = {
    'config': (cmd_config, 'print the resolved config (with --config.* overrides applied)'),
    'devices': (cmd_devices, 'list devices and the device mesh built from the config'),
    'convert': (cmd_convert, 'convert a part of the official PyTorch release into a landiff-jax model directory'),
    'train': (cmd_train, 'train one stage (tokenizer, lm, diffusion) with the sharded training loop'),
    'bench': (cmd_bench, 'time a model at the configured size (peak memory too), next to the PyTorch reference'),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='landiff-jax',
      description='LanDiff text-to-video in JAX: semantic tokenizer, semantic LM, diffusion renderer.',
      epilog='Override any config field with --config.a.b=VALUE, e.g. --config.lm.num_layers=2.')
  parser.add_argument('--version', action='version', version=f'landiff-jax {__version__}')
  sub = parser.add_subparsers(dest='command', metavar='COMMAND')
  for name, (_, help_text) in COMMANDS.items():
    command = sub.add_parser(name, help=help_text, description=help_text)
    add_config_flag(command)
    if name == 'config':
      command.add_argument('--json', action='store_true', help='print as JSON')
    if name == 'convert':
      command.add_argument('part', choices=sorted(CONVERTERS), help='which part of the release to convert')
      command.add_argument('--src', required=True, help='official checkpoint file or directory')
      command.add_argument('--dst', required=True, help='model directory to write')
      command.add_argument('--overwrite', action='store_true', help='replace an existing --dst')
      command.add_argument('--decoder-only', action='store_true',
                           help='vae: convert only the decoder (enough to generate videos)')
      command.add_argument('--base', default='',
                           help='dit: the CogVideoX-2B SAT checkpoint that tensors missing from --src (a LanDiff '
                           'diffusion checkpoint) are read from, as the release loads them')
    if name == 'train':
      command.add_argument('stage', choices=sorted(TRAIN_TASKS), help='which stage to train')
    if name == 'bench':
      from landiff_jax.bench import BENCHMARKS
      command.add_argument('name', choices=sorted(BENCHMARKS), help='what to benchmark')
      command.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
      command.add_argument('--batch', type=int, default=1)
      command.add_argument('--latent-frames', type=int, default=13, help='vae: latent frames to decode')
      command.add_argument('--repeats', type=int, default=3, help='timed calls after the first (compiling) one')
      command.add_argument('--no-reference', dest='reference', action='store_false',
                           help='skip the PyTorch reference run')
      command.add_argument('--out', default='', help='also write the JSON result to this file')
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  try:
    argv, overrides = split_config_overrides(argv)
    args = parser.parse_args(argv)
    if args.command is None:
      parser.print_help()
      return 0
    config = config_lib.load_config(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 2
  handler, _ = COMMANDS[args.command]
  return handler(args, config)


def run() -> None:
  sys.exit(main())


if __name__ == '__main__':
  run()
