"""Procedural videos of coloured shapes with captions, and an analytic detector that reads them back.

Every video is a pure function of (seed, index): one or two shapes of a palette colour move in one of eight
directions (or stay still) with a varying speed and size, over a plain or textured low-saturation background.
Captions say what is seen: "a red triangle moving to the upper left", "a blue circle staying still and a green
star moving down". The detector (`detect`) recovers colour, shape and direction of a one-shape video from pixels
alone; the demo's prompt-following score (`landiff-jax eval shapes`) uses it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

COLORS = {
    'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 90, 230), 'yellow': (235, 215, 40),
    'purple': (150, 60, 210), 'orange': (245, 140, 30), 'cyan': (40, 205, 215),
}
SHAPES = ('circle', 'square', 'triangle', 'star')
# Radius ranges (fractions of the frame's shorter side). At 64×64 a lone shape is about 16–28 px wide, 2–3.5 cells
# of an 8× VAE latent; smaller ones (radius 0.10–0.16) came back from the demo's VAE as blobs (the detector read
# the shape of 5 of 24 reconstructions).
ONE_SHAPE_RADIUS = (0.15, 0.22)
TWO_SHAPE_RADIUS = (0.11, 0.15)
# direction name → unit vector (dx, dy) in image coordinates (y grows downwards)
DIRECTIONS = {
    'right': (1, 0), 'left': (-1, 0), 'up': (0, -1), 'down': (0, 1),
    'upper right': (1, -1), 'upper left': (-1, -1), 'lower right': (1, 1), 'lower left': (-1, 1),
    'still': (0, 0),
}


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  color: str
  shape: str
  direction: str
  size: float  # radius as a fraction of the frame's shorter side
  speed: float  # distance covered over the whole clip, as a fraction of the shorter side
  start: tuple[float, float]  # centre at frame 0, fractions of (width, height)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  shapes: tuple[ShapeSpec, ...]
  background: tuple[int, int, int]
  texture: str  # 'plain', 'stripes' or 'noise'
  texture_seed: int

  @property
  def caption(self) -> str:
    return ' and '.join(describe(s) for s in self.shapes)


def describe(shape: ShapeSpec) -> str:
  motion = 'staying still' if shape.direction == 'still' else (
      f'moving to the {shape.direction}' if ' ' in shape.direction else f'moving {shape.direction}')
  return f'a {shape.color} {shape.shape} {motion}'


def all_combinations() -> list[tuple[str, str, str]]:
  return list(itertools.product(COLORS, SHAPES, DIRECTIONS))


def held_out_combinations(fraction: float = 0.15, seed: int = 1234) -> set[tuple[str, str, str]]:
  """A fixed subset of (colour, shape, direction) never shown in training (every colour, shape and direction
  still appears in training in other combinations)."""
  combos = all_combinations()
  rng = np.random.default_rng(seed)
  return {combos[i] for i in rng.permutation(len(combos))[:int(len(combos) * fraction)]}


def sample_spec(seed: int, index: int, split: str = 'train', two_shapes: float = 0.25) -> VideoSpec:
  """The video of (seed, index). `split` 'train' avoids the held-out combinations, 'heldout' uses only them
  (one shape), 'any' draws from everything."""
  rng = np.random.default_rng([seed, index])
  held_out = held_out_combinations()
  allowed = {'train': [c for c in all_combinations() if c not in held_out], 'heldout': sorted(held_out),
             'any': all_combinations()}[split]
  count = 2 if (split != 'heldout' and rng.uniform() < two_shapes) else 1
  shapes = []
  for k in range(count):
    color, shape, direction = allowed[rng.integers(len(allowed))]
    while shapes and color == shapes[0].color:
      color, shape, direction = allowed[rng.integers(len(allowed))]
    size = float(rng.uniform(*(ONE_SHAPE_RADIUS if count == 1 else TWO_SHAPE_RADIUS)))
    speed = 0.0 if direction == 'still' else float(rng.uniform(0.30, 0.45))
    dx, dy = _unit(direction)
    # start so that the path is centred in the frame
    cx = 0.5 - 0.5 * speed * dx + float(rng.uniform(-0.08, 0.08)) * (1 - abs(dx))
    cy = 0.5 - 0.5 * speed * dy + float(rng.uniform(-0.08, 0.08)) * (1 - abs(dy))
    if count == 2:  # keep the two shapes apart
      cy += (-0.2 if k == 0 else 0.2) * (1 - abs(dy))
      cx += (-0.2 if k == 0 else 0.2) * (1 - abs(dx)) * abs(dy)
    shapes.append(ShapeSpec(color, shape, direction, size, speed, (cx, cy)))
  gray = int(rng.integers(40, 110))
  tint = rng.integers(-12, 13, size=3)
  background = tuple(int(np.clip(gray + t, 0, 255)) for t in tint)
  texture = ('plain', 'stripes', 'noise')[rng.integers(3)]
  return VideoSpec(tuple(shapes), background, texture, int(rng.integers(2**31)))


def _unit(direction: str) -> tuple[float, float]:
  dx, dy = DIRECTIONS[direction]
  norm = math.hypot(dx, dy) or 1.0
  return dx / norm, dy / norm


def _mask(shape: str, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
  """Coverage of a shape centred at 0 with the given radius on offsets (x, y), in pixels."""
  if shape == 'circle':
    return x**2 + y**2 <= radius**2
  if shape == 'square':
    half = radius * 0.85
    return (np.abs(x) <= half) & (np.abs(y) <= half)
  if shape == 'triangle':  # pointing up
    top, bottom, half_width = -radius, radius * 0.75, radius * 1.05
    inside_y = (y >= top) & (y <= bottom)
    return inside_y & (np.abs(x) <= half_width * (y - top) / (bottom - top))
  if shape == 'star':  # five points
    angle = np.arctan2(y, x) + np.pi / 2
    r = np.hypot(x, y)
    spike = np.abs(((angle / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at the points, 0 between them
    return r <= radius * (0.45 + 0.55 * spike**1.5)
  raise ValueError(f'unknown shape {shape!r}; shapes are {SHAPES}.')


def _background(spec: VideoSpec, height: int, width: int) -> np.ndarray:
  base = np.broadcast_to(np.asarray(spec.background, np.float32), (height, width, 3)).copy()
  rng = np.random.default_rng(spec.texture_seed)
  if spec.texture == 'stripes':
    period = rng.uniform(6, 14) * max(height, width) / 64
    phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    base += 10 * np.sin((xx + yy) * 2 * np.pi / period + phase)[..., None]
  elif spec.texture == 'noise':
    coarse = rng.normal(0, 9, (max(2, height // 8), max(2, width // 8), 1))
    base += np.repeat(np.repeat(coarse, 8, 0), 8, 1)[:height, :width]
  return base


def _coverage(spec: VideoSpec, t: int, num_frames: int, height: int, width: int,
              supersample: int) -> list[tuple[ShapeSpec, np.ndarray]]:
  """Each shape's coverage [H, W] (0..1, edges anti-aliased by supersampling) at frame t, in painting order."""
  s = supersample
  yy, xx = np.mgrid[0:height * s, 0:width * s].astype(np.float32)
  xx, yy = (xx + 0.5) / s, (yy + 0.5) / s
  short = min(height, width)
  progress = t / max(num_frames - 1, 1)
  covers = []
  for shape in spec.shapes:
    dx, dy = _unit(shape.direction)
    cx = shape.start[0] * width + dx * shape.speed * short * progress
    cy = shape.start[1] * height + dy * shape.speed * short * progress
    cover = _mask(shape.shape, xx - cx, yy - cy, shape.size * short).astype(np.float32)
    covers.append((shape, cover.reshape(height, s, width, s).mean(axis=(1, 3))))
  return covers


def render(spec: VideoSpec, num_frames: int = 13, height: int = 64, width: int = 64,
           supersample: int = 2) -> np.ndarray:
  """uint8 [T, H, W, 3]; edges anti-aliased by supersampling."""
  background = _background(spec, height, width)
  return np.stack([_paint(spec, t, num_frames, background, supersample) for t in range(num_frames)])


def render_frame(spec: VideoSpec, t: int, num_frames: int, height: int = 64, width: int = 64,
                 supersample: int = 2) -> np.ndarray:
  """uint8 [H, W, 3]: frame t of `render(spec, num_frames, height, width)`, without rendering the others."""
  return _paint(spec, t, num_frames, _background(spec, height, width), supersample)


def _paint(spec: VideoSpec, t: int, num_frames: int, background: np.ndarray, supersample: int) -> np.ndarray:
  frame = background.copy()
  height, width = background.shape[:2]
  for shape, cover in _coverage(spec, t, num_frames, height, width, supersample):
    frame = frame * (1 - cover[..., None]) + np.asarray(COLORS[shape.color], np.float32) * cover[..., None]
  return np.clip(frame, 0, 255).round().astype(np.uint8)


def semantic_class(color: str, shape: str) -> int:
  """The class of a (colour, shape) in `semantic_map`; 0 is the background."""
  return 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


NUM_SEMANTIC_CLASSES = 1 + len(COLORS) * len(SHAPES)


def semantic_map(spec: VideoSpec, t: int, num_frames: int, height: int = 64, width: int = 64, cell: int = 8,
                 supersample: int = 2) -> np.ndarray:
  """float32 [H/cell, W/cell, NUM_SEMANTIC_CLASSES]: the fraction of each cell of frame t (of `render(spec,
  num_frames, ...)`) that shows each (colour, shape) class or the background; every cell sums to 1. The ground
  truth that the demo's semantic feature extractor learns to see (`landiff_jax.train.tasks.theia`)."""
  if height % cell or width % cell:
    raise ValueError(f'frame size {height}x{width} is not a multiple of the semantic cell size {cell}.')
  coverage = np.zeros((height, width, NUM_SEMANTIC_CLASSES), np.float32)
  visible = np.ones((height, width), np.float32)
  for shape, cover in reversed(_coverage(spec, t, num_frames, height, width, supersample)):
    shown = cover * visible  # later shapes are painted over earlier ones
    coverage[..., semantic_class(shape.color, shape.shape)] += shown
    visible = visible - shown
  coverage[..., 0] += visible
  return coverage.reshape(height // cell, cell, width // cell, cell, -1).mean(axis=(1, 3))


class ShapesSource:
  """grain random-access source: {'video': uint8 [T, H, W, 3], 'caption': str} for (seed, index)."""

  def __init__(self, num_videos: int, seed: int = 0, num_frames: int = 13, height: int = 64, width: int = 64,
               split: str = 'train'):
    if split not in ('train', 'heldout', 'any'):
      raise ValueError(f"split must be 'train', 'heldout' or 'any', not {split!r}.")
    self.num_videos, self.seed, self.split = num_videos, seed, split
    self.num_frames, self.height, self.width = num_frames, height, width

  def __len__(self) -> int:
    return self.num_videos

  def spec(self, index: int) -> VideoSpec:
    return sample_spec(self.seed, index, self.split)

  def __getitem__(self, index: int) -> dict:
    spec = self.spec(index)
    return {'video': render(spec, self.num_frames, self.height, self.width), 'caption': spec.caption}


# ---------------------------------------------------------------------------------------------------------------------
# Detector


def foreground(frame: np.ndarray) -> np.ndarray:
  """Pixels of saturated colour (shapes) against the low-saturation backgrounds."""
  f = frame.astype(np.float32)
  saturation = f.max(-1) - f.min(-1)
  return saturation > 70


def classify_shape(mask: np.ndarray) -> str:
  ys, xs = np.nonzero(mask)
  if len(xs) < 6:
    return 'unknown'
  area = len(xs)
  width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
  fill = area / float(width * height)
  # a triangle's widest row is at the bottom, a star's mass is near its centre
  rows = np.bincount(ys - ys.min(), minlength=height)
  quarter = max(1, height // 4)
  bottom_to_top = rows[-quarter:].mean() / max(rows[:quarter].mean(), 1e-6)  # triangle ≈ 4–5, star ≈ 1.5–3
  if fill > 0.88:
    return 'square'
  # rows of a star's lower half are split between its two legs; a triangle's rows are solid
  spans = sum(int(xs[ys == y].max() - xs[ys == y].min() + 1) for y in np.unique(ys))
  row_solidity = area / spans
  if bottom_to_top > 3.3 and fill < 0.7 and row_solidity > 0.97:
    return 'triangle'
  if fill > 0.68:
    return 'circle'
  return 'star'


def classify_direction(track: np.ndarray, frame_size: int) -> str:
  """Direction of the centroid track [T, 2] (x, y): 'still' when it moves less than 5 % of the frame."""
  displacement = track[-1] - track[0]
  if np.hypot(*displacement) < 0.05 * frame_size:
    return 'still'
  angle = math.atan2(displacement[1], displacement[0])
  best, best_dot = 'still', -2.0
  for name, (dx, dy) in DIRECTIONS.items():
    if name == 'still':
      continue
    dot = math.cos(angle - math.atan2(dy, dx))
    if dot > best_dot:
      best, best_dot = name, dot
  return best


def detect(video: np.ndarray) -> dict[str, str]:
  """{'color', 'shape', 'direction'} of the (single) shape in a video uint8 [T, H, W, 3]."""
  video = np.asarray(video)
  masks = np.stack([foreground(f) for f in video])
  if masks.sum() == 0:
    return {'color': 'unknown', 'shape': 'unknown', 'direction': 'unknown'}
  pixels = video[masks].astype(np.float32)
  mean = pixels.mean(0)
  color = min(COLORS, key=lambda c: np.sum((np.asarray(COLORS[c], np.float32) - mean)**2))
  track = []
  for mask in masks:
    ys, xs = np.nonzero(mask)
    if len(xs):
      track.append((xs.mean(), ys.mean()))
  middle = masks[len(masks) // 2] if masks[len(masks) // 2].any() else masks[np.argmax(masks.sum((1, 2)))]
  return {'color': color, 'shape': classify_shape(middle),
          'direction': classify_direction(np.asarray(track), min(video.shape[1:3]))}
