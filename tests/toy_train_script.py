"""Trains the toy task in its own process, for the kill/resume test.

Records {"step", "loss", "ids"} per step to --record (flushed every step). With --kill-at-step N it waits
until step N's checkpoint is finalised on disk and then SIGKILLs its own process.
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy_task import ToyTask, toy_parallel_config, toy_train_config  # pylint: disable=wrong-import-position

from landiff_jax.train import train  # pylint: disable=wrong-import-position
from landiff_jax.train.checkpoint import checkpoint_dir  # pylint: disable=wrong-import-position


def wait_for_checkpoint(workdir, step, timeout_s=120.0):
  final = os.path.join(checkpoint_dir(workdir), str(step))  # orbax renames the temporary dir to this when done
  deadline = time.monotonic() + timeout_s
  while not os.path.isdir(final):
    if time.monotonic() > deadline:
      raise TimeoutError(f'checkpoint {final} did not appear within {timeout_s} s')
    time.sleep(0.01)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--record', required=True)
  parser.add_argument('--kill-at-step', type=int, default=0)
  parser.add_argument('--ema-decay', type=float, default=0.0)
  args = parser.parse_args()
  record = open(args.record, 'a', encoding='utf-8')

  def hook(step, state, metrics):
    del state
    ids = [int(i) for i in metrics['example_ids']]
    record.write(json.dumps({'step': step, 'loss': float(metrics['loss']), 'ids': ids}) + '\n')
    record.flush()
    if step == args.kill_at_step:
      wait_for_checkpoint(args.workdir, step)
      os.kill(os.getpid(), signal.SIGKILL)

  train(ToyTask(), toy_train_config(args.workdir, ema_decay=args.ema_decay), toy_parallel_config(), hooks=[hook])
  record.close()


if __name__ == '__main__':
  main()
