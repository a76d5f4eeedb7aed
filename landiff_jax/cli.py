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


COMMANDS = {
    'config': (cmd_config, 'print the resolved config (with --config.* overrides applied)'),
    'devices': (cmd_devices, 'list devices and the device mesh built from the config'),
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
