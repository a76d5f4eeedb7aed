"""The steps of launch/gpu_check.sh: the kernel's correctness check, then every benchmark, each in its own process
under its own time limit, in order of value, within one overall budget.

After every step it rewrites (atomically) OUT/summary.json — one entry per step: status (ok | failed | timeout |
skipped), seconds, the reason when not ok, and the step's headline figures — and OUT/raw.json (every step's full
JSON, also the partial JSON of a step that timed out), and it appends the step's output to OUT/gpu_check.log; at the
end it writes OUT/tables.md (markdown rows for docs/benchmarks.md). Four files, none nested, so a device machine
that returns few files from its output folder brings everything back.

Usage: python3 launch/gpu_check.py [--tiny] [--out DIR] [--budget SECONDS] [--only NAME,NAME...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.environ.get('PYTHON') or sys.executable
HEADLINE_KEYS = ('median_s', 'tflop', 'positions', 'per_token_ms', 'total_s', 'prefill_s', 'first_call_s',
                 'compile_s', 'mfu', 'tflops', 'forward_tflops', 'forward_backward_tflops', 'forward_mfu',
                 'forward_backward_mfu', 'roofline_fraction', 'speedup', 'passed', 'relative_error', 'line',
                 'seconds', 'peak_gib', 'timed_s', 'total_s_estimate', 'skipped', 'failed', 'time_vs_pallas',
                 'best_tiles', 'compile_and_first_run_s')


ENVIRONMENT_PROBE = """
import json, platform, jax
import landiff_jax.config  # the package and what it needs (ml_collections), as every step imports them
found = dict(jax=jax.__version__, backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
             python=platform.python_version())
try:
  import torch
  found.update(torch=torch.__version__, torch_cuda=torch.cuda.is_available())
except ImportError:
  found['torch'] = None
print(json.dumps(found))
"""


def steps(tiny: bool) -> list[dict]:
  """name, command (after `python3`), time limit (s) and the least time worth starting it with."""
  config = 'configs/tiny.py' if tiny else 'configs/landiff_official.py'
  dtype = 'float32' if tiny else 'bfloat16'
  bench = lambda name, *extra: ['-m', 'landiff_jax', 'bench', name, f'--config={config}', '--dtype', dtype, *extra]
  reference = ['--no-reference'] if tiny else []
  found = [
      dict(name='environment', budget=45, least=10, command=['-c', ENVIRONMENT_PROBE]),
      dict(name='kernel_check', budget=60 if tiny else 100, least=20,
           command=['launch/kernel_check.py', *(['--tiny'] if tiny else [])], json_flag='--out'),
      dict(name='attention_sweep', budget=90 if tiny else 150, least=30,
           command=bench('attention', '--repeats', '1' if tiny else '3', '--sweep', '1' if tiny else '3',
                         *(['--tokens', '40'] if tiny else []), *reference), json_flag='--out'),
      dict(name='lm', budget=60 if tiny else 80, least=30,
           command=bench('lm', '--repeats', '1' if tiny else '2', *reference), json_flag='--out'),
      dict(name='dit', budget=60 if tiny else 75, least=30,
           command=bench('dit', '--repeats', '1' if tiny else '2', *reference), json_flag='--out'),
      dict(name='tokenizer', budget=90 if tiny else 70, least=20,
           command=bench('tokenizer', '--repeats', '1' if tiny else '2'), json_flag='--out'),
      dict(name='vae', budget=120 if tiny else 60, least=20,
           command=bench('vae', '--repeats', '1' if tiny else '2', *reference), json_flag='--out'),
  ]
  if os.path.exists(os.path.join(ROOT, 'landiff_jax', 'bench', 'train.py')):
    found.append(dict(name='train', budget=60 if tiny else 90, least=30,
                      command=bench('train', '--repeats', '1' if tiny else '2'), json_flag='--out'))
  else:
    found.append(dict(name='train', skip='landiff_jax/bench/train.py is not in this checkout (bench train absent)'))
  # Last: two full passes over every stage (about 230 s on an H200 before the LM's speed-up); it gets what is left.
  found.append(dict(name='generate', budget=240, least=60, command=bench('generate'), json_flag='--out'))
  return found


def ordered(found: list[dict], only: str) -> list[dict]:
  """The steps named in --only first, in the order given (a short lease measures what matters most first); the
  others follow, to be reported as skipped."""
  names = [name for name in only.split(',') if name]
  rank = {name: i for i, name in enumerate(names)}
  rank['environment'] = -1  # always first: the other steps are run only where it finds what they need
  return sorted(found, key=lambda step: rank.get(step['name'], len(names)))


def unusable_environment(entry: dict, found: dict | None, tiny: bool) -> str | None:
  """Why no benchmark can run here (said once, instead of every step failing alike), or None."""
  if entry['status'] != 'ok' or not found:
    return (f"{PYTHON} cannot import the package here ({entry.get('reason', 'no probe output')}); run "
            '`bash launch/setup.sh` first, or set PYTHON to an interpreter that has jax and ml_collections '
            '(on a GPU machine without them, put their wheels in .whl/).')
  if not tiny and found.get('backend') != 'gpu':
    return (f"no GPU here (JAX's backend is {found.get('backend')!r}): the release-size benchmarks need one. "
            '`bash launch/gpu_check.sh --tiny` checks the script itself on a CPU.')
  return None


def in_declared_order(summary: dict, declared: list[str]) -> dict:
  """The summary with its steps listed in the script's order, whatever order --only ran them in."""
  rank = {name: i for i, name in enumerate(declared)}
  return dict(summary, steps=dict(sorted(summary['steps'].items(), key=lambda item: rank.get(item[0], len(rank)))))


def headline(value, depth: int = 0):
  """The step's figures worth a glance: leaves under HEADLINE_KEYS (a dict under such a key whole, e.g. generate's
  seconds per stage), nested as found."""
  if not isinstance(value, dict) or depth > 6:
    return None
  out = {}
  for key, item in value.items():
    if key in ('table', 'shape', 'repeats', 'min_s'):
      continue
    if any(key == k or key.endswith(k) for k in HEADLINE_KEYS):
      out[key] = item
    elif isinstance(item, dict):
      sub = headline(item, depth + 1)
      if sub:
        out[key] = sub
  return out


def write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, default=str)
  os.replace(path + '.tmp', path)


def run_step(step: dict, limit: float, work: str, log) -> dict:
  command = [PYTHON, *step['command']]
  out_file = os.path.join(work, f"{step['name']}.json")
  if step.get('json_flag'):
    command += [step['json_flag'], out_file]
  log.write(f"\n===== {step['name']} (limit {limit:.0f} s): {' '.join(command)}\n")
  log.flush()
  start = time.monotonic()
  # `timeout` ends the step; a session of its own lets every process it left behind be ended with it.
  process = subprocess.Popen(['timeout', '-k', '10', str(int(limit)), *command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
  captured = process.communicate()[0].decode(errors='replace')
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  seconds = round(time.monotonic() - start, 1)
  log.write(captured[-200_000:])
  log.flush()
  entry = dict(status='ok', seconds=seconds, exit_code=process.returncode)
  raw = None
  if os.path.exists(out_file):
    try:
      with open(out_file) as f:
        raw = json.load(f)
    except ValueError as e:
      entry['note'] = f'its JSON could not be read: {e}'
  elif step['name'] == 'environment':
    try:
      raw = json.loads(captured.strip().splitlines()[-1])
    except (ValueError, IndexError):
      pass
  if process.returncode in (124, 137):
    entry.update(status='timeout', reason=f'ran past its limit of {limit:.0f} s' +
                 (' (partial results kept)' if raw else ''))
  elif process.returncode != 0:
    tail = [line for line in captured.strip().splitlines() if line.strip()][-3:]
    entry.update(status='failed', reason=' | '.join(tail)[-600:] or f'exit code {process.returncode}')
  elif raw is None:
    entry.update(status='failed', reason='it wrote no JSON')
  if raw is not None:
    entry['figures'] = headline(raw) if isinstance(raw, dict) and step['name'] != 'environment' else raw
  return entry, raw


def tables(raw: dict) -> str:
  """Markdown rows for docs/benchmarks.md from whatever finished."""
  lines = []
  env = raw.get('environment') or {}
  lines.append(f"Device: {', '.join(env.get('devices', ['?']))}; jax {env.get('jax', '?')}, torch "
               f"{env.get('torch', '?')}, Python {env.get('python', '?')}; "
               f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
  kernel = raw.get('kernel_check') or {}
  if kernel.get('cases'):
    lines += ['| kernel check | dtype | out | dq | dk | dv | passed |', '|---|---|---|---|---|---|---|']
    for case in kernel['cases'].values():
      e = case.get('relative_error', {})
      lines.append(f"| {case.get('mask', '?')} | {case.get('dtype', '?')} | {e.get('out', '—')} | "
                   f"{e.get('dq', '—')} | {e.get('dk', '—')} | {e.get('dv', '—')} | "
                   f"{case.get('passed', case.get('failed', '—'))} |")
    lines.append('')
  sweep = raw.get('attention_sweep') or {}
  if sweep.get('cases'):
    try:
      sys.path.insert(0, ROOT)
      from landiff_jax.bench.attention import best_tiles, sweep_table  # pylint: disable=import-outside-toplevel
      lines += [sweep_table(sweep['cases']), '', 'Tiles to paste into TUNED_TILES:', '```']
      lines += [v['line'] for v in best_tiles(sweep['cases']).values()] + ['```', '']
    except Exception as e:  # pylint: disable=broad-except
      lines.append(f'(attention table not rendered: {e})\n')
  lm = (raw.get('lm') or {}).get('landiff_jax')
  if lm:
    torch_lm = (raw.get('lm') or {}).get('pytorch_kv_loop', {})
    lines += ['| LM, one group, CFG batch 2 | per token | total | prefill | roofline | PyTorch per token |',
              '|---|---|---|---|---|---|',
              f"| landiff-jax | {lm.get('per_token_ms')} ms | {lm.get('total_s')} s | {lm.get('prefill_s')} s | "
              f"{lm.get('roofline_fraction', '—')} | {torch_lm.get('per_token_ms', '—')} ms |", '']
  dit = raw.get('dit') or {}
  if dit.get('landiff_jax'):
    ours, theirs = dit['landiff_jax'], (dit.get('diffusers') or {}).get('backbone', {})
    lines += ['| DiT step, CFG batch 2 | median | TFLOP/s | MFU |', '|---|---|---|---|']
    for name in ('backbone', 'backbone_and_control'):
      if isinstance(ours.get(name), dict) and 'median_s' in ours[name]:
        e = ours[name]
        lines.append(f"| landiff-jax {name} | {e['median_s']} s | {e.get('tflops')} | {e.get('mfu')} |")
    if 'median_s' in theirs:
      lines.append(f"| diffusers backbone | {theirs['median_s']} s | {theirs.get('tflops')} | {theirs.get('mfu')} |")
    lines.append('')
  generate = raw.get('generate') or {}
  if generate.get('seconds'):
    lines += ['| generate (warm) | seconds |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in generate['seconds'].items()]
    lines.append('')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true', help='the tiny config on whatever device is here (a CPU test)')
  parser.add_argument('--out', default='', help='output folder (default gpu_check_out/<UTC time>)')
  parser.add_argument('--budget', type=float, default=0, help='seconds for all steps (default 460, tiny 900)')
  parser.add_argument('--only', default='', help='run only these steps (comma-separated), in this order; the rest '
                      'are skipped')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(ROOT, 'gpu_check_out', f'{datetime.datetime.utcnow():%Y%m%d-%H%M%S}')
  os.makedirs(out, exist_ok=True)
  budget = args.budget or (900 if args.tiny else 460)
  only = {name for name in args.only.split(',') if name}
  deadline = time.monotonic() + budget
  work = tempfile.mkdtemp(prefix='gpu_check_')
  summary = dict(started=f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}', tiny=args.tiny,
                 budget_s=budget, steps={})
  raw: dict = {}
  try:
    with open(os.path.join(out, 'gpu_check.log'), 'a') as log:
      declared = [step['name'] for step in steps(args.tiny)]
      stop = None
      for step in ordered(steps(args.tiny), args.only):
        name = step['name']
        left = deadline - time.monotonic()
        if stop:
          summary['steps'][name] = dict(status='skipped', reason=stop)
        elif 'skip' in step:
          summary['steps'][name] = dict(status='skipped', reason=step['skip'])
        elif only and name not in only and name != 'environment':
          summary['steps'][name] = dict(status='skipped', reason='not selected (--only)')
        elif left < step['least']:
          summary['steps'][name] = dict(status='skipped', reason=f'{left:.0f} s of the {budget:.0f} s budget left, '
                                        f"it needs at least {step['least']} s")
        else:
          summary['steps'][name], raw[name] = run_step(step, min(step['budget'], left), work, log)
          if name == 'environment':
            stop = unusable_environment(summary['steps'][name], raw[name], args.tiny)
        entry = summary['steps'][name]
        seconds = f" ({entry['seconds']} s)" if 'seconds' in entry else ''
        print(f"gpu_check: {name}: {entry['status']}{seconds}{': ' + entry['reason'] if 'reason' in entry else ''}",
              flush=True)
        write_json(os.path.join(out, 'raw.json'), raw)
        write_json(os.path.join(out, 'summary.json'), in_declared_order(summary, declared))
    summary = in_declared_order(summary, declared)
    summary['finished'] = f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}'
    summary['all_ok'] = all(s['status'] in ('ok', 'skipped') for s in summary['steps'].values())
    write_json(os.path.join(out, 'summary.json'), summary)
    with open(os.path.join(out, 'tables.md'), 'w') as f:
      f.write(tables(raw))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  print(f'gpu_check: wrote {out}/summary.json, raw.json, tables.md, gpu_check.log', flush=True)
  if stop:
    print(f'gpu_check: error: {stop}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
