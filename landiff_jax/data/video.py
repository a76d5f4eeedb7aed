"""Reading and writing video files (imageio + its bundled ffmpeg), frames as uint8 [T, H, W, 3]."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np


@contextlib.contextmanager
def _ffmpeg_subprocess():
  """imageio runs ffmpeg in a subprocess (fork + exec at once), which JAX's os.fork() warning is not about."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called', category=RuntimeWarning)
    yield


def read_video(path: str, num_frames: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 [T, H, W, 3]. `num_frames` picks that many frames evenly over the clip (first and last included);
  `size` (height, width) resizes to cover then centre-crops."""
  import imageio.v3 as iio

  if not os.path.isfile(path):
    raise FileNotFoundError(f'video {path!r} does not exist.')
  with _ffmpeg_subprocess():
    frames = np.asarray(iio.imread(path, index=None))
  if frames.ndim == 3:
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
    raise ValueError(f'{path}: expected RGB video frames, got an array of shape {frames.shape}.')
  frames = frames[..., :3]
  if num_frames is not None:
    if num_frames < 1:
      raise ValueError(f'num_frames must be at least 1, got {num_frames}.')
    frames = frames[np.linspace(0, len(frames) - 1, num_frames).round().astype(int)]
  if size is not None:
    frames = np.stack([resize_cover_crop(f, size) for f in frames])
  return frames.astype(np.uint8)


def read_fps(path: str) -> float:
  """The frame rate a video file declares."""
  import imageio.v3 as iio

  if not os.path.isfile(path):
    raise FileNotFoundError(f'video {path!r} does not exist.')
  with _ffmpeg_subprocess():
    return float(iio.immeta(path)['fps'])


def resize_cover_crop(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize so the frame covers (height, width), then a centre crop."""
  from PIL import Image

  height, width = size
  scale = max(height / frame.shape[0], width / frame.shape[1])
  resized_h, resized_w = max(height, round(frame.shape[0] * scale)), max(width, round(frame.shape[1] * scale))
  image = Image.fromarray(frame).resize((resized_w, resized_h), Image.BICUBIC)
  top, left = (resized_h - height) // 2, (resized_w - width) // 2
  return np.asarray(image)[top:top + height, left:left + width]


def write_video(path: str, frames: np.ndarray, fps: int = 8) -> str:
  """Writes uint8 (or [0, 1] float) frames [T, H, W, 3] as an H.264 mp4 (or a GIF for a .gif path), atomically."""
  import imageio.v3 as iio

  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'frames must be [T, H, W, 3]; got {frames.shape}.')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  base, extension = os.path.splitext(path)
  tmp = f'{base}.partial{extension}'
  try:
    if extension.lower() == '.gif':
      iio.imwrite(tmp, frames, duration=1000 / fps, loop=0)
    else:
      with _ffmpeg_subprocess():
        iio.imwrite(tmp, frames, fps=fps, codec='libx264', macro_block_size=1)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
