"""`landiff-jax prepare dataset`: a folder of video files with captions → a shard store of training examples.

Each video is decoded (resampled to `fps`, resized to cover the configured frame size and centre-cropped), cut into
non-overlapping groups of `video.num_frames` frames (the release's 49: 13 latent frames, 13 semantic frames), and
every group is encoded once by the models in MODELS:

    theia_features     Theia features of every `vae.temporal_compression`-th frame (the tokenizer's input)
    latents            scaled VAE latents (the renderer's target)
    dit_text           T5 (v1.1) features of the caption, padded to `t5_dit.max_length` (the renderer's text)
    lm_text, lm_text_length   Flan-T5 features of the caption (the LM's text) and their real length
    motion_score       from the captions file (`motion_score`), else 0
    ids, semantic_features    with a trained tokenizer in MODELS/tokenizer: the group's semantic ids (the LM's
                       target) and what the tokenizer decoder makes of them (the control branch's condition)

The videos are split into shards of `videos_per_shard` (in sorted order, fixed by the first run in `plan.json`);
worker processes encode whole shards, and each finished shard is written atomically (see `shards.py`), so a
killed run loses at most the shards in flight and a rerun does only what is missing: a second run does nothing,
and a run with a (new) tokenizer only adds the ids to finished shards, from their stored Theia features. Videos
that cannot be decoded, are too short for one group or have no caption are skipped, printed and listed in
`report.json`; they are never fatal. `index.json` is written when every shard is finished.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from landiff_jax.data import shards

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.gif', '.mov', '.mkv', '.avi')
PLAN_FILE = 'plan.json'
REPORT_FILE = 'report.json'
DECODE_AHEAD = 2  # videos decoded ahead of the one being encoded
MODEL_PARTS = ('vae', 'theia', 't5_lm', 't5_dit', 't5_lm_tokenizer', 't5_dit_tokenizer')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a store's examples depend on besides the videos and models; a rerun must use the same."""
  num_frames: int
  height: int
  width: int
  fps: float  # 0: every decoded frame
  dtype: str  # floating fields are stored in this dtype

  @classmethod
  def from_config(cls, config: Any, fps: float, dtype: str = '') -> 'Settings':
    v = config.video
    return cls(int(v.num_frames), int(v.height), int(v.width), float(fps), dtype or str(config.storage_dtype))


class Skip(Exception):
  """A video that cannot give a training example; the message says why."""


# --- inputs ------------------------------------------------------------------------------------------------------


def read_captions(path: str) -> dict[str, dict[str, Any]]:
  """{video path relative to the folder: {'caption': str, 'motion_score': float}} from a `.jsonl` file (one
  object per line) or a `.csv` file with a header, each with the fields `video` and `caption` (and optionally
  `motion_score`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'captions file {path!r} does not exist; pass --captions FILE (.jsonl or .csv with the '
                            f'fields video, caption).')
  rows: list[tuple[int, dict[str, Any]]] = []
  if path.endswith('.jsonl'):
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append((number, json.loads(line)))
          except json.JSONDecodeError as e:
            raise ValueError(f'{path}:{number}: not a JSON object ({e.msg}); write one object per line.') from None
  elif path.endswith('.csv'):
    with open(path, encoding='utf-8', newline='') as f:
      rows = [(number, row) for number, row in enumerate(csv.DictReader(f), 2)]
  else:
    raise ValueError(f'captions file {path!r} must end in .jsonl or .csv.')
  captions = {}
  for number, row in rows:
    if not isinstance(row, dict) or not row.get('video') or not isinstance(row.get('caption'), str):
      raise ValueError(f'{path}:{number}: every row needs the fields "video" (a path inside the video folder) '
                       f'and "caption" (text); got {row!r}.')
    motion = row.get('motion_score')
    captions[os.path.normpath(row['video'])] = {
        'caption': row['caption'], 'motion_score': float(motion) if motion not in (None, '') else 0.0}
  return captions


def list_videos(src: str) -> list[str]:
  """Every video file under `src` (recursively), as sorted paths relative to it."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f'video folder {src!r} does not exist; pass --src DIR holding mp4/webm/gif files.')
  found = []
  for root, _, files in os.walk(src):
    found += [os.path.relpath(os.path.join(root, name), src) for name in files
              if name.lower().endswith(VIDEO_EXTENSIONS)]
  if not found:
    raise FileNotFoundError(f'{src!r} holds no video files ({", ".join(VIDEO_EXTENSIONS)}).')
  return sorted(found)


def frame_times(source_fps: float, target_fps: float, index: int) -> int:
  """How many times the decoded frame `index` appears in the clip resampled to `target_fps` (0: dropped)."""
  if not target_fps or not source_fps:
    return 1
  first = int(np.ceil((index - 0.5) * target_fps / source_fps))  # output frames k with round(k·src/tgt) == index
  last = int(np.ceil((index + 0.5) * target_fps / source_fps))
  return max(0, last - max(first, 0))


def read_groups(path: str, settings: Settings) -> np.ndarray:
  """uint8 [groups, num_frames, height, width, 3]: the video's whole groups, frames resampled and resized.
  Raises `Skip` for a file that cannot be decoded or is too short for one group."""
  import imageio.v3 as iio

  from landiff_jax.data.video import _ffmpeg_subprocess, resize_cover_crop
  size = (settings.height, settings.width)
  frames = []
  try:
    with _ffmpeg_subprocess():
      meta = iio.immeta(path)
      source_fps = float(meta.get('fps') or (1000.0 / meta['duration'] if meta.get('duration') else 0.0))
      for index, frame in enumerate(iio.imiter(path)):
        frame = np.asarray(frame)
        if frame.ndim == 2:
          frame = np.repeat(frame[..., None], 3, axis=-1)
        repeats = frame_times(source_fps, settings.fps, index)
        if repeats:
          frames += [resize_cover_crop(np.ascontiguousarray(frame[..., :3]), size)] * repeats
  except Exception as e:  # pylint: disable=broad-except
    raise Skip(f'cannot be decoded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
  groups = len(frames) // settings.num_frames
  if not groups:
    raise Skip(f'too short: {len(frames)} frames' + (f' at {settings.fps:g} fps' if settings.fps else '') +
               f', fewer than one group of {settings.num_frames}')
  return np.stack(frames[:groups * settings.num_frames]).reshape(
      groups, settings.num_frames, *size, 3).astype(np.uint8)


# --- encoders ----------------------------------------------------------------------------------------------------


def model_fingerprint(directory: str) -> str:
  """Changes when the model directory is rewritten (its config and the names, sizes and times of its files)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      stat = os.stat(os.path.join(root, name))
      digest.update(f'{os.path.relpath(os.path.join(root, name), directory)}:{stat.st_size}:{stat.st_mtime_ns};'
                    .encode())
  return digest.hexdigest()[:16]


class Encoders:
  """The models of MODELS, loaded once per worker, applied to fixed-size batches (one compilation each)."""

  def __init__(self, models: str, config: Any, batch: int, with_tokenizer: bool):
    import jax.numpy as jnp

    from landiff_jax import checkpoints
    from landiff_jax.data.prepare import TextEncoder
    dtype = jnp.dtype(config.compute_dtype)
    backend = str(config.attention_backend)
    self.batch = batch
    self.vae_model, self.vae_params = checkpoints.load(os.path.join(models, 'vae'), dtype=dtype)
    self.theia_model, self.theia_params = checkpoints.load(os.path.join(models, 'theia'), dtype=dtype,
                                                           attention_backend=backend)
    self.stride = int(self.vae_model.temporal_compression)
    self.dit_text = TextEncoder(models, 't5_dit', int(config.t5_dit.max_length),
                                bool(config.t5_dit.use_attention_mask), dtype=dtype)
    self.lm_text = TextEncoder(models, 't5_lm', int(config.lm.text_max_length),
                               bool(config.t5_lm.use_attention_mask), dtype=dtype)
    self.tokenizer = None
    if with_tokenizer:
      self.tokenizer = checkpoints.load(os.path.join(models, 'tokenizer'), dtype=dtype, attention_backend=backend)

  def _padded(self, array: np.ndarray) -> np.ndarray:
    return np.concatenate([array, np.zeros((self.batch - len(array),) + array.shape[1:], array.dtype)])

  def groups(self, clips: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """Fields of up to `batch` groups [B, F, H, W, 3] uint8 and their captions."""
    import jax.numpy as jnp

    from landiff_jax.models import theia, vae
    count = len(clips)
    clips = self._padded(clips)
    captions = list(captions) + [''] * (self.batch - count)
    latents = vae.encode(self.vae_model, self.vae_params, jnp.asarray(clips, jnp.float32) / 127.5 - 1.0)
    features = theia.video_features(self.theia_model, self.theia_params, clips[:, ::self.stride])
    dit_text, _ = self.dit_text(captions)
    lm_text, lm_length = self.lm_text(captions)
    out = {'theia_features': features, 'latents': latents, 'dit_text': dit_text, 'lm_text': lm_text,
           'lm_text_length': lm_length}
    return {k: np.asarray(v)[:count] for k, v in out.items()}

  def semantic(self, features: np.ndarray) -> dict[str, np.ndarray]:
    """Semantic ids and their decoded features of up to `batch` groups' Theia features."""
    import jax.numpy as jnp

    from landiff_jax.models import tokenizer
    model, params = self.tokenizer
    count = len(features)
    ids = tokenizer.encode_features(model, params, jnp.asarray(self._padded(features)))
    decoded = tokenizer.decode(model, params, ids)
    return {'ids': np.asarray(ids, np.int32)[:count], 'semantic_features': np.asarray(decoded)[:count]}


# --- shard jobs --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  shard: int
  videos: tuple[str, ...]  # empty: add the tokenizer's fields to the finished shard


class Worker:
  """Encodes shards; one per process (built lazily: the models load on the first job)."""

  def __init__(self, src: str, dst: str, models: str, config: Any, settings: Settings,
               captions: dict[str, dict[str, Any]], batch: int, tokenizer_id: str):
    self.src, self.dst, self.models, self.config, self.settings = src, dst, models, config, settings
    self.captions, self.batch, self.tokenizer_id = captions, batch, tokenizer_id
    self.encoders: Encoders | None = None

  def _encoders(self) -> Encoders:
    if self.encoders is None:
      self.encoders = Encoders(self.models, self.config, self.batch, bool(self.tokenizer_id))
    return self.encoders

  def __call__(self, job: Job) -> dict[str, Any]:
    if job.videos:
      return self.encode_shard(job)
    return self.add_tokenizer_fields(job.shard)

  def _groups(self, videos: Sequence[str], skipped: list[dict[str, str]]) -> Iterator[tuple[np.ndarray, dict]]:
    """(clip, meta) of every group of `videos`; bad videos go to `skipped`. The next DECODE_AHEAD videos are
    decoded in threads (ffmpeg runs in its own process, PIL resizes without the GIL) while the models run."""
    from landiff_jax.data.video import _ffmpeg_subprocess
    # catch_warnings is not thread-safe: the filter holds here, around every thread's own
    with _ffmpeg_subprocess(), concurrent.futures.ThreadPoolExecutor(DECODE_AHEAD) as pool:
      pending = collections.deque()
      names = iter(videos)
      for name in itertools.islice(names, DECODE_AHEAD):
        pending.append((name, pool.submit(read_groups, os.path.join(self.src, name), self.settings)))
      while pending:
        name, future = pending.popleft()
        for following in itertools.islice(names, 1):
          pending.append((following, pool.submit(read_groups, os.path.join(self.src, following), self.settings)))
        yield from self._video_groups(name, future, skipped)

  def _video_groups(self, name: str, future: Any, skipped: list[dict[str, str]]) -> Iterator[tuple[np.ndarray, dict]]:
    try:
      clips = future.result()
    except Skip as e:
      skipped.append({'video': name, 'reason': str(e)})
      return
    info = self.captions[name]
    for g, clip in enumerate(clips):
      yield clip, {'video': name, 'group': g, 'caption': info['caption'], 'motion_score': info['motion_score']}

  def _batches(self, items: Iterator[Any]) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
      chunk.append(item)
      if len(chunk) == self.batch:
        yield chunk
        chunk = []
    if chunk:
      yield chunk

  def encode_shard(self, job: Job) -> dict[str, Any]:
    encoders, skipped = self._encoders(), []
    with shards.ShardWriter(self.dst, job.shard) as writer:
      for chunk in self._batches(self._groups(job.videos, skipped)):
        fields = encoders.groups(np.stack([clip for clip, _ in chunk]), [meta['caption'] for _, meta in chunk])
        fields['motion_score'] = np.asarray([meta['motion_score'] for _, meta in chunk], np.float32)
        if encoders.tokenizer is not None:
          fields.update(encoders.semantic(fields['theia_features']))
        for i, (_, meta) in enumerate(chunk):
          writer.write(shards.encode_record({k: self._stored(k, v[i]) for k, v in sorted(fields.items())}, meta))
      return self._finish(writer, skipped, with_ids=encoders.tokenizer is not None)

  def add_tokenizer_fields(self, shard: int) -> dict[str, Any]:
    """Rewrites a finished shard with the ids (and decoded features) of the tokenizer, from its Theia features."""
    encoders = self._encoders()
    skipped = shards.shard_meta(self.dst, shard)['skipped']
    records = (shards.decode_record(record) for record in shards.read_shard(self.dst, shard, self.batch))
    with shards.ShardWriter(self.dst, shard) as writer:
      for chunk in self._batches(records):
        fields = encoders.semantic(np.stack([arrays['theia_features'] for arrays, _ in chunk]).astype(np.float32))
        for i, (arrays, meta) in enumerate(chunk):
          arrays = dict(arrays, **{k: self._stored(k, v[i]) for k, v in fields.items()})
          writer.write(shards.encode_record(dict(sorted(arrays.items())), meta))
      return self._finish(writer, skipped, with_ids=True)

  def _stored(self, name: str, value: np.ndarray) -> np.ndarray:
    """Floating fields in the store's dtype (the motion score stays float32)."""
    if np.issubdtype(value.dtype, np.floating) and name != 'motion_score':
      return value.astype(shards._dtype(self.settings.dtype))  # pylint: disable=protected-access
    return value

  def _finish(self, writer: shards.ShardWriter, skipped: list[dict[str, str]], with_ids: bool) -> dict[str, Any]:
    # a shard that holds no groups needs no ids: it is finished for any tokenizer
    return writer.finish({'skipped': skipped, 'tokenizer': self.tokenizer_id if with_ids or not writer.rows else ''})


_WORKER: Worker | None = None


def _init_process(worker: Worker) -> None:
  global _WORKER
  _WORKER = worker


def _run_job(job: Job) -> dict[str, Any]:
  return _WORKER(job)


# --- the step ----------------------------------------------------------------------------------------------------


def _plan(dst: str, videos: list[str], settings: Settings, videos_per_shard: int) -> list[list[str]]:
  """The videos of each shard: fixed by the first run (plan.json); a rerun must see the same videos and settings."""
  path = os.path.join(dst, PLAN_FILE)
  want = {'settings': dataclasses.asdict(settings), 'videos_per_shard': videos_per_shard, 'videos': videos}
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      have = json.load(f)
    if have != want:
      changed = [k for k in want if have.get(k) != want[k]]
      raise ValueError(f'{dst} was started with other {" and ".join(changed)} (see its {PLAN_FILE}); rerun with '
                       f'the same videos and options, or pass --overwrite or another --dst to start anew.')
  else:
    os.makedirs(dst, exist_ok=True)
    shards.write_json(path, want)
  return [videos[i:i + videos_per_shard] for i in range(0, len(videos), videos_per_shard)]


def _parse_part(part: str) -> tuple[int, int]:
  try:
    index, count = (int(x) for x in part.split('/'))
    if not 0 <= index < count:
      raise ValueError
  except ValueError:
    raise ValueError(f'--part {part!r} must be I/N with 0 ≤ I < N, e.g. 0/4 for the first of four hosts.') from None
  return index, count


def prepare_dataset(src: str, captions_file: str, models: str, dst: str, config: Any, *, workers: int = 1,
                    videos_per_shard: int = 64, batch: int = 2, fps: float = 8.0, dtype: str = '', part: str = '0/1',
                    overwrite: bool = False, log: Any = None) -> dict[str, Any]:
  """Encodes what is missing of the store `dst` (see the module docstring). `workers` processes (1: this one) take
  shards in turn; `part` 'I/N' restricts this run to shards I, I+N, ... (one run per host or per accelerator, all
  writing the same `dst`). Returns a summary; skipped videos are also printed to `log` (default stdout)."""
  log = log or sys.stdout
  part_index, part_count = _parse_part(part)
  if videos_per_shard < 1 or batch < 1:
    raise ValueError('--videos-per-shard and --batch must be at least 1.')
  missing = [name for name in MODEL_PARTS if not os.path.isdir(os.path.join(models, name))]
  if not models or missing:
    raise FileNotFoundError(f'--models {models!r} lacks {", ".join(missing or MODEL_PARTS)}; it must hold the model '
                            f'directories {", ".join(MODEL_PARTS)} (and tokenizer/ for semantic ids) as written by '
                            f'`landiff-jax convert` or `landiff-jax export`.')
  settings = Settings.from_config(config, fps, dtype)
  shards._dtype(settings.dtype)  # pylint: disable=protected-access  (rejects an unknown dtype early)
  captions = read_captions(captions_file)
  found = list_videos(src)
  uncaptioned = [{'video': name, 'reason': f'no caption in {os.path.basename(captions_file)}'}
                 for name in found if os.path.normpath(name) not in captions]
  videos = [name for name in found if os.path.normpath(name) in captions]
  captions = {name: captions[os.path.normpath(name)] for name in videos}
  if overwrite:
    shutil.rmtree(dst, ignore_errors=True)
  plan = _plan(dst, videos, settings, videos_per_shard)
  tokenizer_dir = os.path.join(models, 'tokenizer')
  tokenizer_id = model_fingerprint(tokenizer_dir) if os.path.isdir(tokenizer_dir) else ''

  jobs = []
  for shard in range(part_index, len(plan), part_count):
    meta = shards.shard_meta(dst, shard)
    if meta is None:
      jobs.append(Job(shard, tuple(plan[shard])))
    elif tokenizer_id and meta['tokenizer'] != tokenizer_id:
      jobs.append(Job(shard, ()))
  print(f'prepare dataset: {len(plan)} shards of up to {videos_per_shard} videos; this run '
        f'({part_index}/{part_count}) has {len(jobs)} to write', file=log, flush=True)
  worker = Worker(os.path.abspath(src), os.path.abspath(dst), os.path.abspath(models),
                  config.copy_and_resolve_references(), settings, captions, batch, tokenizer_id)
  written = 0
  for result in _run_jobs(worker, jobs, workers):
    written += 1
    print(f'wrote {result["file"]} ({result["rows"]} groups) [{written}/{len(jobs)}]', file=log, flush=True)
  return _finish(dst, len(plan), uncaptioned, written, log)


def _run_jobs(worker: Worker, jobs: list[Job], workers: int) -> Iterator[dict[str, Any]]:
  if not jobs:
    return
  if workers <= 1 or len(jobs) == 1:
    for job in jobs:
      yield worker(job)
    return
  # several processes may share one accelerator: none takes most of its memory up front (the workers inherit the
  # environment when they start)
  before = os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  try:
    pool = multiprocessing.get_context('spawn').Pool(min(workers, len(jobs)), _init_process, (worker,))
  finally:
    if before is None:
      del os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']
  with pool:
    yield from pool.imap_unordered(_run_job, jobs)


def _finish(dst: str, num_shards: int, uncaptioned: list[dict[str, str]], written: int, log: Any) -> dict[str, Any]:
  """Writes report.json and, once every shard is finished, index.json; prints the skipped videos."""
  metas = [shards.shard_meta(dst, shard) for shard in range(num_shards)]
  done = [meta for meta in metas if meta is not None]
  skipped = sorted(uncaptioned + [bad for meta in done for bad in meta['skipped']], key=lambda bad: bad['video'])
  rows = sum(meta['rows'] for meta in done)
  summary = {'shards': num_shards, 'finished': len(done), 'groups': rows, 'skipped': len(skipped)}
  shards.write_json(os.path.join(dst, REPORT_FILE), dict(summary, skipped=skipped))
  summary['written'] = written
  for bad in skipped:
    print(f'skipped {bad["video"]}: {bad["reason"]}', file=log)
  if len(done) < num_shards:
    print(f'{num_shards - len(done)} shards are not finished yet (other parts still running?); index.json is written '
          f'by the run that finishes the last one.', file=log)
    return dict(summary, complete=False)
  field_sets = [meta['fields'] for meta in done if meta['rows']]
  fields = {k: v for k, v in field_sets[0].items() if all(k in other for other in field_sets)} if field_sets else {}
  index = {'format': shards.FORMAT, 'version': shards.FORMAT_VERSION, 'rows': rows, 'fields': fields,
           'shards': [{'file': meta['file'], 'rows': meta['rows']} for meta in done]}
  with open(os.path.join(dst, PLAN_FILE), encoding='utf-8') as f:
    index['settings'] = json.load(f)['settings']
  shards.write_json(os.path.join(dst, shards.INDEX_FILE), index)
  return dict(summary, complete=True, fields=sorted(fields))
