"""`landiff-jax eval shapes`: does a model trained on the procedural shapes videos follow its prompt?

Each prompt names one shape ("a red triangle moving to the upper left"); the generated video is read back by the
analytic detector of `data/shapes.py` and scored on colour, shape and direction. The same detector runs on
ground-truth renderings of the same prompts (random size, speed, start and background), so the score comes with
the detector's own accuracy. Ablations: the LM's CFG off (`lm_cfg=1`), and the semantic tokens replaced by
uniformly random codes (`random_ids`), which should both score clearly worse when the semantic path carries the
content. The renderer reads the caption too (as LanDiff's does), and it can draw what the caption says whatever the
ids; `dit_caption=False` renders without it, so the score is what the semantic tokens alone carry.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np

from landiff_jax.data import shapes

FIELDS = ('color', 'shape', 'direction')
_CAPTION = re.compile(r'^a (?P<color>\w+) (?P<shape>\w+) (?:moving (?:to the )?(?P<direction>[\w ]+)|staying still)$')


def parse_prompt(prompt: str) -> dict[str, str]:
  """{'color', 'shape', 'direction'} of a one-shape caption in the dataset's wording; ValueError otherwise."""
  match = _CAPTION.match(prompt.strip().lower())
  if not match:
    raise ValueError(f'prompt {prompt!r} is not a one-shape caption like "a red circle moving right" or '
                     '"a blue star staying still".')
  target = {'color': match['color'], 'shape': match['shape'], 'direction': match['direction'] or 'still'}
  known = {'color': shapes.COLORS, 'shape': shapes.SHAPES, 'direction': shapes.DIRECTIONS}
  for field in FIELDS:
    if target[field] not in known[field]:
      raise ValueError(f'prompt {prompt!r}: unknown {field} {target[field]!r}; known: {", ".join(known[field])}.')
  return target


def held_out_prompts(count: int, seed: int = 0) -> list[str]:
  """`count` prompts (with repeats when count exceeds them) from the combinations held out of training."""
  combos = sorted(shapes.held_out_combinations())
  order = np.random.default_rng(seed).permutation(len(combos))
  picked = [combos[order[i % len(combos)]] for i in range(count)]
  return [shapes.describe(shapes.ShapeSpec(c, s, d, 0.1, 0.0, (0.5, 0.5))) for c, s, d in picked]


def ground_truth_video(target: dict[str, str], index: int, num_frames: int, height: int, width: int,
                       seed: int = 0) -> np.ndarray:
  """A rendering of the prompt's combination with the dataset's random size, speed, start and background."""
  rng = np.random.default_rng([seed, index, 7])
  for attempt in range(1000):
    spec = shapes.sample_spec(seed + 1 + int(rng.integers(1 << 30)), attempt, split='any', two_shapes=0.0)
    if spec.shapes[0].direction == target['direction']:
      break
  first = dataclasses.replace(spec.shapes[0], color=target['color'], shape=target['shape'])
  return shapes.render(dataclasses.replace(spec, shapes=(first,)), num_frames, height, width)


def accuracy(targets: list[dict[str, str]], found: list[dict[str, str]]) -> dict[str, float]:
  return {field: float(np.mean([t[field] == f[field] for t, f in zip(targets, found)])) for field in FIELDS}


def evaluate(pipe: Any, prompts: list[str], *, seed: int = 0, lm_cfg: float | None = None,
             dit_steps: int | None = None, random_ids: bool = False, dit_caption: bool = True,
             progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
  """Generates one video per prompt and scores it; also scores the detector on ground-truth renderings."""
  targets = [parse_prompt(p) for p in prompts]
  c = pipe.config
  frames, height, width = int(c.video.num_frames), int(c.video.height), int(c.video.width)
  truth = [shapes.detect(ground_truth_video(t, i, frames, height, width, seed)) for i, t in enumerate(targets)]
  found, rows = [], []
  for i, (prompt, target) in enumerate(zip(prompts, targets)):
    if random_ids:
      ids = np.random.default_rng([seed, i]).integers(0, pipe.layout.codebook_size, pipe.layout.tokens_per_group)
      video = pipe.render_ids(ids.astype(np.int32), prompt, jax.random.key(seed + i), dit_steps,
                              dit_caption=dit_caption)
    else:
      video = pipe.generate(prompt, seed=seed + i, lm_cfg=lm_cfg, dit_steps=dit_steps, dit_caption=dit_caption).video
    detected = shapes.detect(video)
    found.append(detected)
    rows.append(dict(prompt=prompt, detected=detected))
    progress(f'[{i + 1}/{len(prompts)}] {prompt!r} → {detected}')
  return dict(prompts=len(prompts), accuracy=accuracy(targets, found),
              detector_accuracy_on_ground_truth=accuracy(targets, truth),
              settings=dict(seed=seed, lm_cfg=lm_cfg, dit_steps=dit_steps, random_ids=random_ids,
                            dit_caption=dit_caption), videos=rows)
