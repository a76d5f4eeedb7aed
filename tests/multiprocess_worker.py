"""`landiff-jax` (same arguments) that also records which training examples this process read, for
tests/test_multiprocess.py; run it directly or as `LANDIFF_JAX` of launch/local_multiprocess.sh.

With MULTIPROCESS_RECORD=PATH set, every local batch the loop hands to `shard_batch` is written to
`PATH.<process index>` as one JSON line `{"process", "process_count", "rows"}`, `rows` being the file indices
in `train.data_dir` of the batch's examples (matched by the bytes of their `text` array, unique per example).
The first line is the loop's peek at the first batch, which step 1 then reads again.
"""

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import glob  # pylint: disable=wrong-import-position
import json  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position


def data_dir_of(argv):
  for token in argv:
    if token.startswith('--config.train.data_dir='):
      return token.split('=', 1)[1]
  raise SystemExit('multiprocess_worker: pass --config.train.data_dir=DIR')


def install_recorder(path, data_dir):
  import jax  # pylint: disable=import-outside-toplevel
  from landiff_jax import parallel  # pylint: disable=import-outside-toplevel

  index_of = {}
  for i, file in enumerate(sorted(glob.glob(os.path.join(data_dir, '*.npz')))):
    with np.load(file) as data:
      index_of[np.ascontiguousarray(data['text']).tobytes()] = i
  shard_batch = parallel.shard_batch

  def recording_shard_batch(local_batch, mesh, rules):
    rows = [index_of[np.ascontiguousarray(row).tobytes()] for row in np.asarray(local_batch['text'])]
    with open(f'{path}.{jax.process_index()}', 'a', encoding='utf-8') as f:
      f.write(json.dumps({'process': jax.process_index(), 'process_count': jax.process_count(),
                          'rows': rows}) + '\n')
    return shard_batch(local_batch, mesh, rules)

  parallel.shard_batch = recording_shard_batch  # the loop calls `parallel.shard_batch`


def main():
  argv = sys.argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.environ.get('MULTIPROCESS_RECORD'):
    install_recorder(os.environ['MULTIPROCESS_RECORD'], data_dir_of(argv))
  from landiff_jax.cli import main as cli_main  # pylint: disable=import-outside-toplevel
  return cli_main(argv)


if __name__ == '__main__':
  sys.exit(main())
