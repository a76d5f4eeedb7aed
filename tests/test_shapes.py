"""The procedural shapes dataset: deterministic, captions true to the pixels, held-out combinations kept out."""

import numpy as np

from landiff_jax.data import shapes
from landiff_jax.data.pipeline import make_batch_iterator


def test_vocabulary_is_large_enough():
  assert len(shapes.COLORS) >= 6 and len(shapes.SHAPES) >= 4 and len(shapes.DIRECTIONS) >= 9


def test_videos_are_deterministic_per_seed_and_index():
  a, b = shapes.ShapesSource(4, seed=3), shapes.ShapesSource(4, seed=3)
  np.testing.assert_array_equal(a[2]['video'], b[2]['video'])
  assert a[2]['caption'] == b[2]['caption']
  assert not np.array_equal(a[2]['video'], shapes.ShapesSource(4, seed=4)[2]['video'])
  video = shapes.ShapesSource(1, num_frames=9, height=48, width=80)[0]['video']
  assert video.shape == (9, 48, 80, 3) and video.dtype == np.uint8


def test_the_detector_reads_back_the_captions():
  source = shapes.ShapesSource(120, seed=11, split='any')
  checked, correct = 0, 0
  for i in range(len(source)):
    spec = source.spec(i)
    if len(spec.shapes) != 1:
      continue
    found = shapes.detect(source[i]['video'])
    truth = spec.shapes[0]
    correct += found == {'color': truth.color, 'shape': truth.shape, 'direction': truth.direction}
    checked += 1
    assert shapes.describe(truth) == source[i]['caption']
  assert checked >= 60 and correct / checked >= 0.95, (correct, checked)


def test_captions_name_both_shapes_of_two_shape_videos():
  source = shapes.ShapesSource(40, seed=5)
  two = [source.spec(i) for i in range(len(source)) if len(source.spec(i).shapes) == 2]
  assert two, 'expected some two-shape videos'
  for spec in two:
    first, second = spec.shapes
    assert spec.caption == f'{shapes.describe(first)} and {shapes.describe(second)}' and first.color != second.color


def test_held_out_combinations_never_appear_in_training():
  held_out = shapes.held_out_combinations()
  train = shapes.ShapesSource(200, seed=0, split='train')
  seen = {(s.color, s.shape, s.direction) for i in range(len(train)) for s in train.spec(i).shapes}
  assert not seen & held_out
  heldout = shapes.ShapesSource(50, seed=0, split='heldout')
  assert all((s.color, s.shape, s.direction) in held_out for i in range(50) for s in heldout.spec(i).shapes)


def test_the_source_feeds_the_input_pipeline():
  batches = make_batch_iterator(shapes.ShapesSource(8, num_frames=5, height=32, width=32), 4, seed=0, shuffle=True,
                                process_index=0, process_count=1)
  batch = next(batches)
  assert batch['video'].shape == (4, 5, 32, 32, 3) and len(batch['caption']) == 4


def test_semantic_maps_say_what_covers_each_cell():
  """Cells sum to one; the shape classes cover where the detector sees saturated pixels, under the caption's
  (colour, shape); one frame renders as it does inside its video."""
  for index in range(6):
    spec = shapes.sample_spec(0, index)
    video = shapes.render(spec, 9, 32, 48)
    for t in (0, 8):
      np.testing.assert_array_equal(shapes.render_frame(spec, t, 9, 32, 48), video[t])
      semantics = shapes.semantic_map(spec, t, 9, 32, 48, cell=8)
      assert semantics.shape == (4, 6, shapes.NUM_SEMANTIC_CLASSES)
      np.testing.assert_allclose(semantics.sum(-1), 1.0, atol=1e-5)
      seen = shapes.foreground(video[t]).reshape(4, 8, 6, 8).mean(axis=(1, 3))
      np.testing.assert_allclose(1 - semantics[..., 0], seen, atol=0.1)
      classes = {shapes.semantic_class(s.color, s.shape) for s in spec.shapes}
      assert set(np.flatnonzero(semantics.reshape(-1, semantics.shape[-1]).sum(0) > 0)) == {0} | classes


def test_every_shape_stays_inside_the_frame():
  """Paths are straight, so a shape clear of the border at the first and last frame is clear throughout."""
  for split in ('train', 'heldout'):
    for index in range(200):
      spec = shapes.sample_spec(0, index, split)
      for t in (0, 48):
        for shape, cover in shapes._coverage(spec, t, 49, 64, 64, supersample=1):
          border = np.concatenate([cover[0], cover[-1], cover[:, 0], cover[:, -1]])
          assert cover.sum() > 0 and border.max() == 0, (split, index, t, shape)
