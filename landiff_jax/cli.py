"""The `landiff-jax` command line.

    landiff-jax COMMAND [ARGS] --config=configs/x.py [--config.a.b=VALUE ...]

Each command is a small function registered in `COMMANDS`; heavy imports happen inside the command so that
`--help` stays fast. Config overrides use the ml_collections flag syntax and are validated against the config.
"""

import argparse
import json
import os
import sys

from landiff_jax import __version__
from landiff_jax import config as config_lib
from landiff_jax.attention_limit import DEFAULT_MAX_SCORES_GIB, scores_limit

DEFAULT_CONFIG = 'configs/landiff_official.py'
# The built-in demo (configs/shapes_demo.py trained by launch/train_demo.sh): `generate` and `eval` use it when no
# --ckpt is given. It ships in the git checkout, next to the package.
DEMO_CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'models', 'shapes-demo')


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


# part → 'module:function' converting {name: array} and the part's config (checkpoints.part_config) into params.
CONVERTERS = {
    'vae': 'landiff_jax.convert.vae:convert_vae',
    'dit': 'landiff_jax.convert.dit:convert_dit',
    'tokenizer': 'landiff_jax.convert.tokenizer:convert_tokenizer',
    'theia': 'landiff_jax.convert.theia:convert_theia',  # HF ViT dir, or the tokenizer file's copy
    'lm': 'landiff_jax.convert.lm:convert_lm',
    't5_lm': 'landiff_jax.convert.t5:convert_t5',  # Flan-T5-XXL (the LM's text encoder)
    't5_dit': 'landiff_jax.convert.t5:convert_t5',  # T5-v1.1-XXL (the DiT's text encoder)
}


# other names for a part: LanDiff's engine checkpoint is the renderer (backbone, control branch, upsampler)
CONVERTER_ALIASES = {'landiff-diffusion': 'dit'}


def cmd_convert(args, config) -> int:
  """Converts one part of the official release into a landiff-jax model directory."""
  import importlib
  import tempfile
  import time

  import jax

  from landiff_jax import checkpoints
  from landiff_jax.convert import common, io, notices

  if args.part == 'all':
    return convert_all(args, config)
  args.part = CONVERTER_ALIASES.get(args.part, args.part)
  if os.path.exists(args.dst) and not args.overwrite:
    print(f'landiff-jax: error: {args.dst} already exists; choose another --dst or pass --overwrite.',
          file=sys.stderr)
    return 2
  if args.decoder_only and args.part != 'vae':
    print(f'landiff-jax: error: --decoder-only applies to the vae only, not to {args.part}.', file=sys.stderr)
    return 2
  if args.base and args.part not in ('dit', 'tokenizer', 'vae', 't5_dit'):
    print(f'landiff-jax: error: --base applies to the parts LanDiff\'s engine checkpoint overlays (dit, tokenizer, '
          f'vae, t5_dit), not to {args.part}.', file=sys.stderr)
    return 2
  dtype = args.dtype or config.get('storage_dtype', 'float32')
  function_path = CONVERTERS[args.part]
  module_name, function_name = function_path.split(':')
  convert_fn = getattr(importlib.import_module(module_name), function_name)
  start = time.perf_counter()
  parent = os.path.dirname(os.path.abspath(args.dst))
  os.makedirs(parent, exist_ok=True)
  # converted parameters wait in files beside --dst, not in memory, until saved (see convert.common.spilling)
  with tempfile.TemporaryDirectory(prefix='.landiff-convert-', dir=parent) as spill, common.spilling(spill), \
       notices(lambda message: print(f'note: {message}')):
    try:
      state_dict = io.load_state_dict(args.src)
      print(f'read {len(state_dict)} tensors from {state_dict.source or args.src}')
      part_config = checkpoints.part_config(config, args.part)
      options = {}
      if args.base:
        base = io.load_state_dict(args.base)
        print(f'read {len(base)} tensors from {args.base}')
        if args.part in ('dit', 'tokenizer'):
          options['base_state_dict'] = base
        else:  # the engine's copy of a frozen part over the part's own file
          from landiff_jax.convert.release import over_engine
          state_dict = over_engine(args.part, state_dict, base)
      if args.decoder_only:
        options['decoder_only'] = True
        part_config.with_encoder = False
      if args.part in ('t5_dit', 't5_lm'):
        options['section'] = args.part
      params = common.cast_params(convert_fn(state_dict, part_config, **options), dtype)
      dst = checkpoints.save(args.dst, part=args.part, config=part_config, params=params,
                             overwrite=args.overwrite, source=os.path.abspath(args.src))
    except Exception as e:  # pylint: disable=broad-except  (one line; --verbose shows the traceback)
      return conversion_failed(e, args)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f'wrote {args.part} ({count:,} parameters, {dtype}) to {dst} in {time.perf_counter() - start:.1f} s')
  return 0


def conversion_failed(error: Exception, args) -> int:
  """One line on stderr; with --verbose also the details behind it and the traceback."""
  from landiff_jax.checkpoints import CheckpointError
  from landiff_jax.convert import ConversionError

  message = ' '.join(str(error).split())
  if not isinstance(error, (ConversionError, CheckpointError)):  # unforeseen: say what and where
    message = f'converting {args.part} from {args.src} failed: {type(error).__name__}: {message[:300]}'
  print(f'landiff-jax: error: {message}', file=sys.stderr)
  if getattr(args, 'verbose', False):
    import traceback
    details = getattr(error, 'details', '')
    if details:
      print(details, file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
  return 1


def cmd_bench(args, config) -> int:
  """Runs one benchmark and prints its result as JSON (also written to --out)."""
  import importlib

  from landiff_jax.bench import BENCHMARKS

  module_name, function_name = BENCHMARKS[args.name].split(':')
  try:
    if args.batch < 1 or args.repeats < 0 or args.latent_frames < 1 or args.tokens < 1:
      raise OptionError('--batch, --latent-frames and --tokens must be at least 1 and --repeats at least 0.')
    if args.offload and args.offload not in OFFLOAD_MODES + ('both',):
      raise OptionError(f'--offload must be one of {", ".join(OFFLOAD_MODES + ("both",))}, got {args.offload!r}.')
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
      raise OptionError(f'the folder of --out {args.out} does not exist; create it first.')
    start_runtime(args, config)
    result = getattr(importlib.import_module(module_name), function_name)(config, args)
  except ValueError as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 2
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    write_atomically(args.out, lambda tmp: open(tmp, 'w').write(text + '\n'))
  return 0


# stage → 'module:Task class' (constructed with the whole config).
TRAIN_TASKS = {
    'backbone': 'landiff_jax.train.tasks.diffusion:BackboneTask',
    'diffusion': 'landiff_jax.train.tasks.diffusion:DiffusionTask',
    'tokenizer': 'landiff_jax.train.tasks.tokenizer:TokenizerTask',
    'lm': 'landiff_jax.train.tasks.lm:LMTask',
    'theia': 'landiff_jax.train.tasks.theia:TheiaTask',
    'vae': 'landiff_jax.train.tasks.vae:VAETask',
}


def cmd_train(args, config) -> int:
  """Trains one stage with the generic loop; resumes from the latest checkpoint in train.workdir."""
  import importlib

  from landiff_jax import parallel
  from landiff_jax.train import train

  module_name, class_name = TRAIN_TASKS[args.stage].split(':')
  try:
    # before anything touches a device: building a task may create arrays, after which JAX refuses to start
    # the multi-process runtime
    start_runtime(args, config)
    parallel.initialize_distributed(config.parallel)
    task = getattr(importlib.import_module(module_name), class_name)(config)
    state = train(task, config.train, config.parallel, config=config.to_dict())
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(f'trained {args.stage} to step {int(state.step)}; checkpoints and metrics in {config.train.workdir}')
  return 0


def cmd_export(args, config) -> int:
  """A training run's latest checkpoint → a model directory (for generate, init_from, the next stage's data)."""
  from landiff_jax.checkpoints import CheckpointError
  from landiff_jax.train.export import export
  try:
    dst = export(args.stage, args.workdir, args.dst, decoder_only=args.decoder_only, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, CheckpointError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.stage} parameters of {args.workdir} to {dst}')
  return 0


def cmd_prepare(args, config) -> int:
  """One data-preparation step of the demo's recipe (launch/train_demo.sh); see landiff_jax/data/prepare.py."""
  from landiff_jax.checkpoints import CheckpointError
  from landiff_jax.data import prepare
  try:
    if args.step == 'videos':
      v = config.video
      result = prepare.write_videos(args.dst, num=args.num, seed=args.seed, frames=args.frames or int(v.num_frames),
                                    height=int(v.height), width=int(v.width), workers=args.workers,
                                    overwrite=args.overwrite)
    elif args.step == 'semantics':
      v = config.video
      from landiff_jax.train.tasks.theia import cell_size
      result = prepare.write_semantics(args.dst, num=args.num, seed=args.seed, frames=args.frames or int(v.num_frames),
                                       height=int(v.height), width=int(v.width), cell=cell_size(config.theia),
                                       workers=args.workers, overwrite=args.overwrite)
    elif args.step == 'frozen':
      result = prepare.write_frozen(args.dst, config, seed=args.seed, overwrite=args.overwrite)
    elif args.step == 'encode':
      result = prepare.encode(args.src, args.models, args.dst, config, overwrite=args.overwrite)
    elif args.step == 'tokens':
      result = prepare.tokens(args.src, args.models, args.dst, overwrite=args.overwrite)
    elif args.step == 'dataset':
      from landiff_jax.data import ingest
      result = ingest.prepare_dataset(args.src, args.captions, args.models, args.dst, config,
                                      workers=args.workers or 1, videos_per_shard=args.videos_per_shard,
                                      batch=args.batch, fps=args.fps, dtype=args.dtype, part=args.part,
                                      overwrite=args.overwrite)
    else:
      result = prepare.assemble(args.models, args.dst, config, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError, CheckpointError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(f'prepare {args.step}: {json.dumps(result)}')
  return 0


def convert_all(args, config) -> int:
  from landiff_jax.convert import notices
  from landiff_jax.convert.release import convert_release

  if args.base or args.decoder_only:
    print('landiff-jax: error: --base and --decoder-only apply to single parts, not to `convert all`.',
          file=sys.stderr)
    return 2
  try:
    with notices(lambda message: print(f'note: {message}')):
      report = convert_release(args.src, args.dst, config, t5=args.t5 or None, flan_t5=args.flan_t5 or None,
                               theia=args.theia or None, dtype=args.dtype or None)
  except Exception as e:  # pylint: disable=broad-except  (one line; --verbose shows the traceback)
    return conversion_failed(e, args)
  print('\n'.join(f'  {part}: {state}' for part, state in report.items()))
  print(f'pipeline directory ready: {args.dst}  (landiff-jax generate --ckpt {args.dst} --prompt "...")')
  return 0


class OptionError(ValueError):
  """A command-line option that cannot work; found before anything loads."""


def start_runtime(args, config) -> None:
  """Process start-up shared by the commands that compile: the persistent compilation cache (config.runtime;
  off with --no-compile-cache) and compile statistics. Runs after the options are checked, before JAX compiles."""
  from landiff_jax import runtime
  section = config.get('runtime', None) or {}
  runtime.setup(section, use_cache=not getattr(args, 'no_compile_cache', False))


def read_prompts(path: str) -> list[str]:
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f]
  except (OSError, UnicodeDecodeError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else 'not UTF-8 text'
    raise OptionError(f'--prompts {path} cannot be read ({reason}); give a UTF-8 text file, one prompt per line.') \
        from None
  while lines and not lines[-1].strip():
    lines.pop()
  empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
  if empty or not lines:
    raise OptionError(f'{path}: line(s) {empty or [1]} hold no prompt; write one prompt per line.')
  return lines


def default_out(args) -> str:
  """--out when not given: video.mp4, or with --prompts a folder named after the prompt file (prompts.txt →
  prompts-videos/)."""
  if args.out:
    return args.out
  if args.prompts:
    return os.path.splitext(os.path.basename(args.prompts.rstrip(os.sep)))[0] + '-videos'
  return 'video.mp4'


def output_paths(args, count: int) -> list[str]:
  """The video paths; checks (creating nothing) that they and their side files can be written."""
  if count == 1 and not args.prompts:
    paths = [args.out]
    if os.path.isdir(args.out):
      raise OptionError(f'--out {args.out} is a folder; give an .mp4 path (a folder is for --prompts).')
  else:  # a folder of videos, created when the first one is written
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise OptionError(f'--out {args.out} is a file; with --prompts it names a folder of videos.')
    paths = [os.path.join(args.out, f'{i:03d}.mp4') for i in range(count)]
  folders = {os.path.dirname(os.path.abspath(paths[0]))}
  for folder in folders:
    new_folder_ok = count > 1 or args.prompts  # a --prompts folder is made in an existing one
    existing = folder if os.path.isdir(folder) or not new_folder_ok else os.path.dirname(folder)
    if not os.path.isdir(existing):
      raise OptionError(f'the output folder {existing} does not exist; create it first.')
    if not os.access(existing, os.W_OK):
      raise OptionError(f'the output folder {existing} is not writable.')
  outputs = list(paths)
  for path in paths:
    base = os.path.splitext(path)[0]
    outputs += [base + '.ids.npy'] if args.save_ids else []
    outputs += [base + '.frames.png'] if args.save_frames else []
  if args.save_frames and len(paths) > 1:
    outputs.append(os.path.join(args.out, 'frames.png'))
  if not args.overwrite:
    for path in outputs:
      if os.path.exists(path):
        raise OptionError(f'{path} already exists; pass --overwrite or choose another --out.')
  return paths


def write_atomically(path: str, write) -> None:
  """`write(temporary_path)`, then renamed to `path`: a crash leaves no half-written output."""
  base, extension = os.path.splitext(path)
  tmp = f'{base}.partial-{os.getpid()}{extension}'
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def contact_row(frames, columns: int = 7):
  """`columns` frames taken evenly from a video, side by side: [H, columns·W, 3]."""
  import numpy as np
  picks = frames[np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)]
  return np.concatenate(list(picks), axis=1)


def save_contact_sheet(rows: list, path: str) -> None:
  """Rows of frames (`contact_row`, one per video of one pipeline, so equally wide) stacked into one PNG."""
  import numpy as np
  from PIL import Image
  write_atomically(path, lambda tmp: Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format='PNG'))


def pipeline_dir(ckpt: str | None) -> str:
  """--ckpt, or the built-in demo when it is not given."""
  if ckpt:
    return ckpt
  if not os.path.isdir(DEMO_CKPT):
    raise FileNotFoundError(f'no --ckpt given and the built-in demo {DEMO_CKPT} is missing (it ships in a git '
                            'checkout of landiff-jax). Pass --ckpt PIPELINE_DIR, or train the demo with '
                            '`bash launch/train_demo.sh runs/demo` and pass --ckpt runs/demo/pipeline.')
  return DEMO_CKPT


def check_sampling_options(args) -> None:
  """The sampling options generate and eval share; each bad value named with its valid range."""
  groups = getattr(args, 'groups', 1)
  if groups < 1:
    raise OptionError(f'--groups must be at least 1 (13-frame semantic groups), got {groups}.')
  if args.steps is not None and args.steps < 1:
    raise OptionError(f'--steps must be at least 1 (diffusion steps; the release uses 50), got {args.steps}.')
  motion = getattr(args, 'motion', None)
  if motion is not None and not 0.0 <= motion <= 1.0:
    raise OptionError(f'--motion must be in [0, 1] (the release uses 0.1), got {motion}.')
  if args.lm_cfg is not None and not args.lm_cfg >= 0.0:
    raise OptionError(f'--lm-cfg must be 0 or more (1 = no guidance; the release uses 7.5), got {args.lm_cfg}.')
  offload = getattr(args, 'offload', None)
  if offload is not None and offload not in OFFLOAD_MODES:
    raise OptionError(f'--offload must be one of {", ".join(OFFLOAD_MODES)}, got {offload!r}.')


OFFLOAD_MODES = ('none', 'stage')  # runtime.OFFLOAD_MODES (not imported here: it would not change --help's speed)


def prepare_pipeline_config(args, config):
  """(pipeline directory, its config with this command line's overrides), checked from files alone."""
  from landiff_jax import runtime
  ckpt = pipeline_dir(args.ckpt)
  runtime.check_pipeline_directory(ckpt)
  pipe_config = runtime.read_pipeline_config(ckpt)
  if 'runtime' not in pipe_config:  # converted before the config had a runtime section
    pipe_config.runtime = config.runtime.to_dict()
  pipe_config = config_lib.apply_overrides(pipe_config, args.overrides)
  if getattr(args, 'offload', None):
    pipe_config.runtime.offload = args.offload
  offload = pipe_config.runtime.get('offload', 'none')
  if offload not in OFFLOAD_MODES:
    raise OptionError(f'config.runtime.offload must be one of {", ".join(OFFLOAD_MODES)}, got {offload!r}.')
  return ckpt, pipe_config


def cmd_generate(args, config) -> int:
  """Generates videos from prompts with a converted (or the demo) pipeline directory."""
  import time

  from landiff_jax import runtime

  try:  # every option, file and output is checked before JAX is imported or a model loads
    check_sampling_options(args)
    prompts = read_prompts(args.prompts) if args.prompts else [args.prompt]
    if not prompts[0] or not prompts[0].strip():
      raise OptionError('give a prompt with --prompt "..." or a file of prompts with --prompts FILE.')
    args.out = default_out(args)
    paths = output_paths(args, len(prompts))
    ckpt, pipe_config = prepare_pipeline_config(args, config)
    start_runtime(args, pipe_config)
    import numpy as np

    from landiff_jax import pipeline
    from landiff_jax.data.video import write_video
    start = time.perf_counter()
    pipe = pipeline.load(ckpt, config=pipe_config, progress=lambda message: print(f'  {message}', flush=True))
    print(f'loaded {ckpt} in {time.perf_counter() - start:.1f} s (offload: {pipe.offload})')
    rows = []
    for prompt, path in zip(prompts, paths):
      print(f'{prompt!r} → {path}')
      result = pipe.generate(prompt, seed=args.seed, motion_score=args.motion, lm_cfg=args.lm_cfg,
                             dit_steps=args.steps, num_groups=args.groups)
      write_video(path, result.video, fps=result.fps)
      base = os.path.splitext(path)[0]
      if args.save_ids:
        write_atomically(base + '.ids.npy', lambda tmp: np.save(tmp, result.ids))
      if args.save_frames:
        rows.append(contact_row(result.video))
        save_contact_sheet(rows[-1:], base + '.frames.png')
      print(f'  wrote {len(result.video)} frames {result.video.shape[1]}x{result.video.shape[2]} at {result.fps} fps '
            f'in {result.seconds["total"]:.1f} s')
    if len(rows) > 1:  # a folder of videos: also one sheet of them all, a row per prompt
      sheet = os.path.join(args.out, 'frames.png')
      save_contact_sheet(rows, sheet)
      print(f'contact sheet of all {len(rows)} videos: {sheet}')
    print('compilation: ' + json.dumps(runtime.compile_stats.summary()))
  except (ValueError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  return 0


def cmd_eval(args, config) -> int:
  """Scores a pipeline on prompts with an analytic detector (suite 'shapes': the procedural demo videos)."""
  try:  # options, prompts and files first: nothing loads until they are right
    check_sampling_options(args)
    if args.num_prompts < 1:
      raise OptionError(f'--num-prompts must be at least 1, got {args.num_prompts}.')
    from landiff_jax.eval import shapes as shapes_eval
    prompts = read_prompts(args.prompts) if args.prompts else shapes_eval.held_out_prompts(args.num_prompts)
    for prompt in prompts:
      shapes_eval.parse_prompt(prompt)  # reject a bad prompt before the models load
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
      raise OptionError(f'the folder of --out {args.out} does not exist; create it first.')
    ckpt, pipe_config = prepare_pipeline_config(args, config)
    start_runtime(args, pipe_config)
    from landiff_jax import pipeline
    pipe = pipeline.load(ckpt, config=pipe_config)
    result = shapes_eval.evaluate(pipe, prompts, seed=args.seed, lm_cfg=args.lm_cfg, dit_steps=args.steps,
                                  random_ids=args.random_ids, dit_caption=not args.no_dit_caption,
                                  progress=lambda message: print(message, flush=True))
  except (ValueError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  summary = {k: v for k, v in result.items() if k != 'videos'}
  print(json.dumps(summary, indent=2))
  if args.out:
    write_atomically(args.out, lambda tmp: _write_json(tmp, result))
  return 0


def _write_json(path: str, value) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def parse_mesh(text: str) -> dict[str, int]:
  sizes = {}
  for part in filter(None, text.split(',')):
    name, _, value = part.partition('=')
    if name not in ('data', 'fsdp', 'tensor') or not value.lstrip('-').isdigit():
      raise ValueError(f'--mesh takes data=N,fsdp=N,tensor=N (−1 for "the rest"); got {text!r}.')
    sizes[name] = int(value)
  return sizes


def _plan_in_subprocess(args, devices: int) -> int | None:
  """Runs this `plan` again in a child process that simulates `devices` CPU devices (the device count is fixed once
  JAX has started); None when this process already sees enough devices."""
  import subprocess

  import jax

  if jax.device_count() >= devices:
    return None
  if os.environ.get('LANDIFF_PLAN_CHILD'):
    raise ValueError(f'the plan needs {devices} devices and still sees {jax.device_count()}; set '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={devices} JAX_PLATFORMS=cpu.')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', LANDIFF_PLAN_CHILD='1',
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']))
  print(f'simulating {devices} CPU devices in a child process (this one sees {jax.device_count()})', file=sys.stderr)
  return subprocess.call([sys.executable, '-m', 'landiff_jax', *args.argv], env=env)


def cmd_plan(args, config) -> int:
  """Compiles one training step of a stage on abstract shapes and prints per-device memory and FLOPs."""
  import importlib

  import jax

  from landiff_jax import parallel
  from landiff_jax.train.plan import TARGETS, plan_step, plan_target

  try:
    if args.target:
      if args.target not in TARGETS:
        raise ValueError(f'unknown --target {args.target!r}; known targets: {sorted(TARGETS)}.')
      returncode = _plan_in_subprocess(args, TARGETS[args.target].devices)
      if returncode is not None:
        return returncode
    if args.config == DEFAULT_CONFIG:  # the stage's own training config
      config = config_lib.load_config(f'configs/train.py:{args.stage}', args.overrides)
    if args.mesh:
      config.parallel.mesh.update(parse_mesh(args.mesh))
    module_name, class_name = TRAIN_TASKS[args.stage].split(':')
    if args.target:
      task = getattr(importlib.import_module(module_name), class_name)(config)
      result = plan_target(args.stage, task, config, args.target, per_device_batch=args.per_device_batch or None)
    else:
      config.parallel.mesh.update(parse_mesh(args.mesh or 'data=-1'))
      config.train.batch_size = args.batch
      task = getattr(importlib.import_module(module_name), class_name)(config)
      mesh = parallel.make_mesh(config.parallel.mesh)
      result = plan_step(task, config.train, config.parallel, mesh, task.example_shapes(args.batch))
      result = dict(stage=args.stage, devices=f'{len(jax.devices())} x {jax.devices()[0].device_kind}', **result)
  except (ValueError, config_lib.ConfigError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(result, indent=2))
  return 0


def tokenizer_parts(ckpt: str, attention_backend: str):
  """(theia, tokenizer) (model, params) pairs of a pipeline directory converted with Theia."""
  from landiff_jax import checkpoints
  return tuple(checkpoints.load(os.path.join(ckpt, part), attention_backend=attention_backend)
               for part in ('theia', 'tokenizer'))


def check_encode_options(args, config):
  """encode / reconstruct: the video, the model directories and --out checked from files; returns the config."""
  from landiff_jax import runtime
  if args.frames < 0:
    raise OptionError(f'--frames must be 0 (one group) or more, got {args.frames}.')
  if not os.path.isfile(args.video) or not os.access(args.video, os.R_OK):
    raise OptionError(f'--video {args.video} is not a readable file.')
  for part in ('theia', 'tokenizer'):
    path = os.path.join(args.ckpt, part)
    if not os.path.isdir(path):
      raise OptionError(f'{args.ckpt} has no {part}/ model directory; convert it (`landiff-jax convert all ... --theia '
                        f'DIR`, or `landiff-jax convert {part} --src ... --dst {path}`).')
    found = runtime.read_model_part(path)
    if found != part:
      raise OptionError(f'{path} holds a {found} model, not a {part}; convert it with `landiff-jax convert {part}`.')
  out = getattr(args, 'out', '')
  if out:
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
      raise OptionError(f'the folder of --out {out} does not exist; create it first.')
    if os.path.exists(out) and not args.overwrite:
      raise OptionError(f'{out} already exists; pass --overwrite or choose another --out.')
  if os.path.isfile(os.path.join(args.ckpt, runtime.PIPELINE_CONFIG_FILE)):  # the directory's own sizes, then overrides
    config = config_lib.apply_overrides(runtime.read_pipeline_config(args.ckpt), args.overrides)
  return config


def encode_video(args, config):
  """Theia features [T, h, w, C] and semantic ids [N] of a video file."""
  import numpy as np

  from landiff_jax.data.video import read_video
  from landiff_jax.models import theia, tokenizer
  (theia_model, theia_params), (tok_model, tok_params) = tokenizer_parts(args.ckpt, config.attention_backend)
  frames = args.frames or int(config.tokenizer.frames_per_group)
  video = read_video(args.video, num_frames=frames, size=(int(config.video.height), int(config.video.width)))
  features = theia.video_features(theia_model, theia_params, video[None])
  ids = tokenizer.encode_features(tok_model, tok_params, features)
  return np.asarray(features[0]), np.asarray(ids[0]), (tok_model, tok_params)


def cmd_encode(args, config) -> int:
  """Video file → semantic ids (.npy), through Theia and the tokenizer encoder."""
  try:
    config = check_encode_options(args, config)
    start_runtime(args, config)
    import numpy as np
    _, ids, _ = encode_video(args, config)
    write_atomically(args.out, lambda tmp: np.save(tmp, ids))
  except (ValueError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {ids.shape[0]} semantic ids to {args.out}')
  return 0


def cmd_reconstruct(args, config) -> int:
  """Video file → ids → features again; prints how well the tokenizer reconstructs the Theia features."""
  try:
    config = check_encode_options(args, config)
    start_runtime(args, config)
    import numpy as np

    from landiff_jax.models import tokenizer
    features, ids, (model, params) = encode_video(args, config)
  except (ValueError, FileNotFoundError, config_lib.ConfigError) as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 1
  decoded = np.asarray(tokenizer.decode(model, params, ids[None])[0])
  mse = float(np.mean((decoded - features)**2))
  cosine = float(np.mean(np.sum(decoded * features, -1) / (np.linalg.norm(decoded, axis=-1) *
                                                            np.linalg.norm(features, axis=-1) + 1e-8)))
  print(json.dumps({'ids': int(ids.shape[0]), 'feature_mse': mse, 'feature_variance': float(features.var()),
                    'relative_mse': mse / max(float(features.var()), 1e-12), 'mean_cosine': cosine}, indent=2))
  return 0


COMMANDS = {
    'config': (cmd_config, 'print the resolved config (with --config.* overrides applied)'),
    'devices': (cmd_devices, 'list devices and the device mesh built from the config'),
    'convert': (cmd_convert, 'convert a part of the official PyTorch release into a landiff-jax model directory'),
    'generate': (cmd_generate, 'generate videos from text prompts'),
    'encode': (cmd_encode, 'a video file to semantic ids (Theia + tokenizer encoder)'),
    'reconstruct': (cmd_reconstruct, 'a video file to ids and back to features, with the reconstruction error'),
    'train': (cmd_train, 'train one stage (vae, theia, tokenizer, lm, backbone, diffusion) with the sharded training '
                         'loop'),
    'prepare': (cmd_prepare, 'a data-preparation step of the demo recipe (videos, semantics, frozen, encode, tokens, '
                             'assemble), or `dataset`: video files and captions to shards for real training'),
    'export': (cmd_export, 'a training run\'s latest checkpoint as a model directory'),
    'eval': (cmd_eval, 'score prompt following with an analytic detector (shapes: the built-in demo)'),
    'plan': (cmd_plan, 'per-device memory and FLOPs of a training step on a mesh, compiled ahead of time'),
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
    if name in ('encode', 'reconstruct'):
      command.add_argument('--video', required=True, help='video file (mp4, gif, …)')
      command.add_argument('--ckpt', required=True, help='directory holding theia/ and tokenizer/ model directories')
      command.add_argument('--frames', type=int, default=0, help='frames taken evenly (default: one group, 13)')
      if name == 'encode':
        command.add_argument('--out', default='ids.npy', help='where to write the ids')
        command.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    if name == 'generate':
      command.add_argument('--ckpt', default='', help='pipeline directory (from `landiff-jax convert all` or '
                           'launch/train_demo.sh; default: the built-in demo, models/shapes-demo)')
      command.add_argument('--prompt', default='', help='what the video shows')
      command.add_argument('--prompts', default='', help='a text file with one prompt per line (then --out is a folder)')
      command.add_argument('--out', default='', help='mp4 to write (default video.mp4), or with --prompts a folder '
                           '(default: named after the prompt file, prompts.txt → prompts-videos/)')
      command.add_argument('--seed', type=int, default=None, help='default: the official 42')
      command.add_argument('--motion', type=float, default=None, help='motion score in [0, 1] (default 0.1)')
      command.add_argument('--lm-cfg', type=float, default=None, help='LM guidance scale (default: the pipeline\'s '
                           'config; the release: 7.5)')
      command.add_argument('--steps', type=int, default=None, help='diffusion steps (default: the pipeline\'s config; '
                           'the release: 50)')
      command.add_argument('--groups', type=int, default=1, help='13-frame semantic groups (more = longer video)')
      command.add_argument('--save-ids', action='store_true', help='also write the semantic ids (.ids.npy)')
      command.add_argument('--save-frames', action='store_true', help='also write a PNG contact sheet of frames '
                           '(with --prompts, also OUT/frames.png: all videos, a row each)')
      command.add_argument('--overwrite', action='store_true', help='replace existing outputs')
      command.add_argument('--offload', default=None, help='none: every part stays on the device; stage: only the '
                           'running stage\'s parts (fits a 24 GB GPU at full size; default: config.runtime.offload)')
    if name in ('generate', 'encode', 'reconstruct', 'eval', 'bench', 'train'):
      command.add_argument('--no-compile-cache', action='store_true',
                           help='do not use the persistent compilation cache (config.runtime.compilation_cache; '
                           'default folder $XDG_CACHE_HOME or ~/.cache, /landiff-jax/xla)')
    if name == 'eval':
      command.add_argument('suite', choices=['shapes'], help='what to evaluate')
      command.add_argument('--ckpt', default='', help='pipeline directory (default: the built-in demo)')
      command.add_argument('--prompts', default='', help='one prompt per line (default: held-out combinations)')
      command.add_argument('--num-prompts', type=int, default=100, help='without --prompts: how many to draw')
      command.add_argument('--seed', type=int, default=0, help='seed of the first video (then +1 per prompt)')
      command.add_argument('--lm-cfg', type=float, default=None, help='LM guidance (1 = off; default: config)')
      command.add_argument('--steps', type=int, default=None, help='diffusion steps (default: config)')
      command.add_argument('--random-ids', action='store_true', help='ablation: random semantic ids, no LM')
      command.add_argument('--no-dit-caption', action='store_true',
                           help='ablation: the renderer gets no caption, so what the video shows comes from the '
                           'semantic ids alone')
      command.add_argument('--out', default='', help='also write every video\'s detection as JSON')
    if name == 'convert':
      command.add_argument('part', choices=sorted(CONVERTERS) + sorted(CONVERTER_ALIASES) + ['all'],
                           help='which part of the release to convert')
      command.add_argument('--src', required=True, help='official checkpoint file or directory (all: ckpts/LanDiff)')
      command.add_argument('--t5', default='', help='all: T5-v1.1-XXL directory (default: in the release)')
      command.add_argument('--flan-t5', default='', help='all: Flan-T5-XXL directory with its tokenizer')
      command.add_argument('--theia', default='', help='all: Theia/DeiT ViT directory (default: the copy inside the '
                           'tokenizer file, if any); needed only to encode videos')
      command.add_argument('--dst', required=True, help='model directory to write')
      command.add_argument('--overwrite', action='store_true', help='replace an existing --dst')
      command.add_argument('--decoder-only', action='store_true',
                           help='vae: convert only the decoder (enough to generate videos)')
      command.add_argument('--base', default='',
                           help='dit: the CogVideoX-2B SAT checkpoint that tensors missing from --src (a LanDiff '
                           'diffusion checkpoint) are read from, as the release loads them; tokenizer, vae, t5_dit: '
                           'the part\'s own file (tokenizer/model.safetensors, 3d-vae.pt, the T5 folder) under the '
                           'copy inside --src (the LanDiff engine), if it holds one')
      command.add_argument('--dtype', default=None, choices=['bfloat16', 'float32'],
                           help='dtype the parameters are stored in (default: the config\'s storage_dtype: '
                           'bfloat16 for the release, float32 for the tiny and demo configs)')
      command.add_argument('--verbose', action='store_true',
                           help='on failure, also print the full lists of keys and the traceback')
    if name == 'train':
      command.add_argument('stage', choices=sorted(TRAIN_TASKS), help='which stage to train')
    if name == 'prepare':
      command.add_argument('step',
                           choices=['videos', 'semantics', 'frozen', 'encode', 'tokens', 'assemble', 'dataset'],
                           help='see landiff_jax/data/prepare.py (dataset: landiff_jax/data/ingest.py)')
      command.add_argument('--dst', required=True, help='directory to write (replaced only with --overwrite)')
      command.add_argument('--src', default='', help='encode: the videos; tokens: the output of encode; '
                           'dataset: a folder of video files (mp4, webm, gif)')
      command.add_argument('--models', default='', help='encode, tokens, assemble: the model directories so far; '
                           'dataset: theia, vae, t5_lm, t5_dit (+ tokenizers) and optionally tokenizer')
      command.add_argument('--num', type=int, default=1000, help='videos, semantics: how many')
      command.add_argument('--seed', type=int, default=0,
                           help='videos, semantics: dataset seed; frozen: initialisation seed')
      command.add_argument('--frames', type=int, default=0,
                           help='videos, semantics: frames per clip (default video.num_frames)')
      command.add_argument('--workers', type=int, default=0,
                           help='videos, semantics: rendering processes (0: one per CPU); dataset: '
                           'encoding processes (0: 1)')
      command.add_argument('--overwrite', action='store_true', help='replace an existing --dst')
      command.add_argument('--captions', default='', help='dataset: captions of the videos in --src (.jsonl or .csv '
                           'with the fields video, caption and optionally motion_score)')
      command.add_argument('--videos-per-shard', type=int, default=64, help='dataset: videos per shard')
      command.add_argument('--batch', type=int, default=2,
                           help='dataset: groups encoded per model call (the VAE encoder takes ~13 GiB of '
                           'temporaries per 49-frame 480x720 group)')
      command.add_argument('--fps', type=float, default=8.0,
                           help='dataset: frame rate the videos are resampled to (the release: 8; 0: every frame)')
      command.add_argument('--dtype', default='', help='dataset: dtype of stored features and latents (default: '
                           'the config\'s storage_dtype)')
      command.add_argument('--part', default='0/1', help='dataset: I/N: only shards I, I+N, ... (one run per host '
                           'or accelerator, all writing the same --dst)')
    if name == 'export':
      command.add_argument('stage', choices=sorted(TRAIN_TASKS), help='the stage the run trained')
      command.add_argument('--workdir', required=True, help='the run\'s train.workdir')
      command.add_argument('--dst', required=True, help='model directory to write')
      command.add_argument('--decoder-only', action='store_true', help='vae: leave the encoder out')
      command.add_argument('--overwrite', action='store_true', help='replace an existing --dst')
    if name == 'plan':
      command.add_argument('--stage', required=True, choices=sorted(TRAIN_TASKS), help='which stage to plan')
      command.add_argument('--target', default='', help='a named machine (landiff_jax/train/plan.py TARGETS: '
                           'h100x8, h200x8, v5p-64, v6e-64): memory per device against its HBM, the largest batch '
                           'that fits, FLOPs per step; the mesh is the stage\'s plan (configs/train.py PLANS) on '
                           'its devices, simulated on CPU when fewer are visible')
      command.add_argument('--per-device-batch', type=int, default=0,
                           help='with --target: plan this batch (one compile) instead of searching the largest')
      command.add_argument('--mesh', default='', help='mesh sizes, e.g. data=1,fsdp=8,tensor=1 (default without '
                           '--target: data=-1)')
      command.add_argument('--batch', type=int, default=8, help='without --target: global batch size')
    if name == 'bench':
      from landiff_jax.bench import BENCHMARKS
      command.add_argument('name', choices=sorted(BENCHMARKS), help='what to benchmark')
      command.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
      command.add_argument('--batch', type=int, default=1, help='examples (train: per batch shard)')
      command.add_argument('--latent-frames', type=int, default=13, help='vae: latent frames to decode')
      command.add_argument('--tokens', type=int, default=1500, help='attention: LM sequence length')
      command.add_argument('--repeats', type=int, default=3, help='timed calls after the first (compiling) one')
      command.add_argument('--no-reference', dest='reference', action='store_false',
                           help='skip the PyTorch reference run')
      command.add_argument('--stage', default='', choices=[''] + sorted(TRAIN_TASKS),
                           help='train: which stage\'s training step (configs/train.py:STAGE)')
      command.add_argument('--sweep', type=int, nargs='?', const=0, default=None, metavar='N',
                           help="attention: time the Pallas kernel's candidate tiles (the first N per head dim)")
      command.add_argument('--out', default='', help='also write the JSON result to this file')
      command.add_argument('--tiny', action='store_true', help='generate: configs/tiny.py sizes; train: '
                           'configs/train.py:STAGE,tiny (both run on a CPU)')
      command.add_argument('--estimate', action='store_true',
                           help='generate: the peak device memory of one video per offload mode, computed from '
                           'shapes (stored bytes + compiled temporaries of each stage), no weights, no run')
      command.add_argument('--offload', default='', help='generate: none, stage or both (default: both)')
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
    args.overrides = overrides
    args.argv = list(argv) + [f'--config.{o}' for o in overrides]
  except config_lib.ConfigError as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 2
  handler, _ = COMMANDS[args.command]
  try:
    limit = scores_limit(config.get('attention_max_scores_gib', DEFAULT_MAX_SCORES_GIB))
  except ValueError as e:
    print(f'landiff-jax: error: {e}', file=sys.stderr)
    return 2
  with limit:  # every command traces its attention under the config's scores limit
    return handler(args, config)


def run() -> None:
  sys.exit(main())


if __name__ == '__main__':
  run()
