"""Data preparation between the demo's training stages (`landiff-jax prepare STEP`, see `launch/train_demo.sh`).

    videos    procedural shapes clips → DIR/*.npz {video uint8 [F, H, W, 3], caption}
    semantics single frames and what covers each of their cells → DIR/*.npz {frame uint8 [H, W, 3], semantics
              float32 [H/c, W/c, classes]}: the examples of the semantic ViT stage (`train theia`)
    frozen    the parts that are not trained: two random T5 encoders and the word-level text tokenizer they read
              → MODELS/{t5_lm, t5_dit, t5_lm_tokenizer, t5_dit_tokenizer}
    encode    videos → the tokenizer's examples (Theia features of every 4th frame), the backbone's (scaled VAE
              latents, DiT text features) and the LM's text features; sets the VAE's latent scaling factor first
    tokens    tokenizer examples → the LM's examples (semantic ids) and the diffusion stage's (latents, text, and the
              tokenizer decoder's features of those ids: what the renderer sees when it generates)
    assemble  MODELS → a pipeline directory (`landiff-jax generate --ckpt DIR`)

Every step writes a fresh directory through a temporary one, so an interrupted step leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from landiff_jax import checkpoints, pipeline
from landiff_jax.data import shapes
from landiff_jax.parallel.sharding import strip_partitioning

FROZEN_PARTS = ('t5_lm', 't5_dit')
# T5's special tokens, at T5's ids
SPECIAL_TOKENS = ('<pad>', '</s>', '<unk>')


@contextlib.contextmanager
def fresh_directory(dst: str, overwrite: bool) -> Iterator[str]:
  """A temporary directory beside `dst` that becomes `dst` when the block finishes without error."""
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f'{dst} already exists; pass --overwrite or choose another --dst.')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  tmp = f'{dst}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def require_models(models: str, names: Any) -> None:
  """Raises FileNotFoundError naming every model directory of `names` that MODELS lacks."""
  missing = [name for name in names if not os.path.isdir(os.path.join(models, name))]
  if missing:
    raise FileNotFoundError(f'{models} lacks {", ".join(missing)}; run the earlier steps of launch/train_demo.sh.')


def npz_files(directory: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(directory, '*.npz')))
  if not files:
    raise FileNotFoundError(f'{directory} holds no .npz examples; run the earlier `landiff-jax prepare` step first.')
  return files


# --- videos ----------------------------------------------------------------------------------------------------


def _write_video(job: tuple[str, int, int, int, int, int, str]) -> None:
  path, seed, index, frames, height, width, split = job
  spec = shapes.sample_spec(seed, index, split)
  np.savez(path, video=shapes.render(spec, frames, height, width), caption=np.asarray(spec.caption))


def write_videos(dst: str, *, num: int, seed: int, frames: int, height: int, width: int, split: str = 'train',
                 workers: int = 0, overwrite: bool = False) -> str:
  """`num` shapes clips of (seed, index) as `.npz` files, rendered by `workers` processes (0: one per CPU)."""
  return _write_examples(_write_video, dst, num, workers, overwrite, seed, frames, height, width, split)


def _write_semantics(job: tuple[str, int, int, int, int, int, int]) -> None:
  path, seed, index, frames, height, width, cell = job
  spec = shapes.sample_spec(seed, index, 'train')
  t = int(np.random.default_rng([seed, index, 1]).integers(frames))
  np.savez(path, frame=shapes.render_frame(spec, t, frames, height, width),
           semantics=shapes.semantic_map(spec, t, frames, height, width, cell))


def write_semantics(dst: str, *, num: int, seed: int, frames: int, height: int, width: int, cell: int,
                    workers: int = 0, overwrite: bool = False) -> str:
  """`num` frames, one at a random time of each clip (seed, index) of `frames` frames, with their semantic maps
  (`shapes.semantic_map` with `cell`-pixel cells)."""
  return _write_examples(_write_semantics, dst, num, workers, overwrite, seed, frames, height, width, cell)


def _write_examples(write: Any, dst: str, num: int, workers: int, overwrite: bool, seed: int, *rest: Any) -> str:
  """`write((path, seed, index, *rest))` for index < num into a fresh `dst`, by `workers` processes (0: per CPU)."""
  if num < 1:
    raise ValueError(f'--num must be at least 1, got {num}.')
  workers = workers or os.cpu_count() or 1
  with fresh_directory(dst, overwrite) as tmp:
    jobs = [(os.path.join(tmp, f'{i:06d}.npz'), seed, i, *rest) for i in range(num)]
    if workers == 1:
      for job in jobs:
        write(job)
    else:
      with multiprocessing.get_context('spawn').Pool(workers) as pool:
        pool.map(write, jobs, chunksize=16)
  return dst


# --- frozen parts --------------------------------------------------------------------------------------------------


def caption_words() -> list[str]:
  """Every word a shapes caption can use."""
  words = {'a', 'and', 'moving', 'to', 'the', 'staying', 'still'}
  words |= set(shapes.COLORS) | set(shapes.SHAPES)
  for direction in shapes.DIRECTIONS:
    words |= set(direction.split())
  return sorted(words)


def save_word_tokenizer(dst: str, vocab_size: int) -> None:
  """A T5-style word-level tokenizer (lower-cased words, `</s>` appended, `<pad>` = 0) of the captions' words,
  saved so that `transformers.AutoTokenizer.from_pretrained(dst)` loads it offline."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(caption_words()))}
  if len(vocab) > vocab_size:
    raise ValueError(f'the captions need {len(vocab)} token ids; raise t5_lm.vocab_size / t5_dit.vocab_size.')
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tokenizer.normalizer = normalizers.Lowercase()
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.post_processor = processors.TemplateProcessing(single='$A </s>', special_tokens=[('</s>', 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
  fast.save_pretrained(dst)


def write_frozen(dst: str, config: ml_collections.ConfigDict, *, seed: int = 0, overwrite: bool = False) -> str:
  """Randomly initialised T5 encoders (never trained: fixed random features, like a frozen pretrained encoder) and
  the text tokenizers, as model directories under `dst`."""
  with fresh_directory(dst, overwrite) as tmp:
    for i, part in enumerate(FROZEN_PARTS):
      model = checkpoints.build_model(part, config[part])
      params = jax.device_get(strip_partitioning(model.init_params(jax.random.key(seed + i))))
      checkpoints.save(os.path.join(tmp, part), part=part, config=config[part], params=params)
    for part, name in pipeline.TEXT_TOKENIZERS.items():
      save_word_tokenizer(os.path.join(tmp, name), int(config[part].vocab_size))
  return dst


# --- encode ------------------------------------------------------------------------------------------------------


def batches(files: list[str], size: int) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
  for start in range(0, len(files), size):
    names = files[start:start + size]
    loaded = []
    for name in names:
      with np.load(name, allow_pickle=False) as data:
        loaded.append({k: data[k] for k in data.files})
    yield names, {k: np.stack([d[k] for d in loaded]) for k in loaded[0]}


class TextEncoder:
  """A T5 part of MODELS with its tokenizer: captions → features padded to `max_length`, and their lengths."""

  def __init__(self, models: str, part: str, max_length: int, use_mask: bool, **model_kwargs: Any):
    from landiff_jax.models import t5
    self.t5 = t5
    self.model, self.params = checkpoints.load(os.path.join(models, part), **model_kwargs)
    self.tokenizer = t5.load_tokenizer(os.path.join(models, f'{part}_tokenizer'))
    self.max_length, self.use_mask = max_length, use_mask

  def __call__(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = self.t5.tokenize(self.tokenizer, captions, self.max_length, pad_to_max=True)
    hidden = np.asarray(self.t5.encode(self.model, self.params, ids, mask if self.use_mask else None))
    return hidden, mask.sum(axis=1).astype(np.int32)


def latent_scale(model: Any, params: Any, video: np.ndarray) -> float:
  """1 / std of the VAE's posterior means over `video`: the scaling factor that gives the renderer unit-variance
  latents (how Stable Diffusion and CogVideoX chose theirs)."""
  from landiff_jax.models import vae
  mean, _ = vae.encode_moments(model, params, jnp.asarray(video, jnp.float32) / 127.5 - 1.0)
  return float(1.0 / np.std(np.asarray(mean)))


def set_vae_scale(models: str, files: list[str], count: int = 32) -> tuple[Any, Any]:
  """Measures the latent scaling factor on the first `count` videos, stores it in MODELS/vae's config and returns
  the VAE (model, params) that uses it."""
  path = os.path.join(models, 'vae')
  meta = checkpoints.read_meta(path)
  model, params = checkpoints.load(path)
  _, first = next(batches(files[:count], count))
  scale = latent_scale(model, params, first['video'])
  meta['config']['scaling_factor'] = scale
  with open(os.path.join(path, checkpoints.CONFIG_FILE) + '.tmp', 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(os.path.join(path, checkpoints.CONFIG_FILE) + '.tmp', os.path.join(path, checkpoints.CONFIG_FILE))
  return model.clone(scaling_factor=scale), params


def encode(src: str, models: str, dst: str, config: ml_collections.ConfigDict, *, batch: int = 16,
           overwrite: bool = False) -> dict[str, Any]:
  """Videos → dst/{tokenizer, backbone, text}/*.npz (one file per video in each)."""
  from landiff_jax.models import theia, vae
  files = npz_files(src)
  require_models(models, ('vae', 'theia') + FROZEN_PARTS + tuple(pipeline.TEXT_TOKENIZERS.values()))
  vae_model, vae_params = set_vae_scale(models, files)
  theia_model, theia_params = checkpoints.load(os.path.join(models, 'theia'))
  stride = int(config.vae.temporal_compression)
  dit_text = TextEncoder(models, 't5_dit', int(config.t5_dit.max_length), bool(config.t5_dit.use_attention_mask))
  lm_text = TextEncoder(models, 't5_lm', int(config.lm.text_max_length), bool(config.t5_lm.use_attention_mask))
  with fresh_directory(dst, overwrite) as tmp:
    for sub in ('tokenizer', 'backbone', 'text'):
      os.makedirs(os.path.join(tmp, sub))
    for names, data in batches(files, batch):
      video = data['video']
      latents = np.asarray(vae.encode(vae_model, vae_params, jnp.asarray(video, jnp.float32) / 127.5 - 1.0))
      features = np.asarray(theia.video_features(theia_model, theia_params, video[:, ::stride]))
      captions = [str(c) for c in data['caption']]
      dit_features, _ = dit_text(captions)
      lm_features, lengths = lm_text(captions)
      for i, name in enumerate(names):
        base = os.path.basename(name)
        np.savez(os.path.join(tmp, 'tokenizer', base), features=features[i])
        np.savez(os.path.join(tmp, 'backbone', base), latents=latents[i], text=dit_features[i])
        np.savez(os.path.join(tmp, 'text', base), text=lm_features[i], text_length=lengths[i],
                 motion_score=np.float32(0.0), caption=np.asarray(captions[i]))
  return dict(videos=len(files), latent_scaling_factor=vae_model.scaling_factor, latent_shape=list(latents.shape[1:]),
              feature_shape=list(features.shape[1:]))


def tokens(src: str, models: str, dst: str, *, batch: int = 64, overwrite: bool = False) -> dict[str, Any]:
  """src (from `encode`) → dst/{lm, diffusion}/*.npz, through the trained tokenizer at MODELS/tokenizer."""
  from landiff_jax.models import tokenizer
  files = npz_files(os.path.join(src, 'tokenizer'))
  model, params = checkpoints.load(os.path.join(models, 'tokenizer'))
  used = np.zeros(model.settings.codebook_size, np.int64)
  with fresh_directory(dst, overwrite) as tmp:
    for sub in ('lm', 'diffusion'):
      os.makedirs(os.path.join(tmp, sub))
    for names, data in batches(files, batch):
      ids = np.asarray(tokenizer.encode_features(model, params, jnp.asarray(data['features'])))
      decoded = np.asarray(tokenizer.decode(model, params, ids))
      used += np.bincount(ids.ravel(), minlength=used.size)
      for i, name in enumerate(names):
        base = os.path.basename(name)
        with np.load(os.path.join(src, 'text', base)) as text, np.load(os.path.join(src, 'backbone', base)) as bb:
          np.savez(os.path.join(tmp, 'lm', base), ids=ids[i].astype(np.int32), text=text['text'],
                   text_length=text['text_length'], motion_score=text['motion_score'])
          np.savez(os.path.join(tmp, 'diffusion', base), latents=bb['latents'], text=bb['text'], features=decoded[i])
  return dict(examples=len(files), tokens_per_video=int(ids.shape[1]), codes_used=int((used > 0).sum()),
              codebook_size=int(used.size))


# --- assemble ------------------------------------------------------------------------------------------------------


def assemble(models: str, dst: str, config: ml_collections.ConfigDict, *, overwrite: bool = False) -> str:
  """MODELS/{parts, text tokenizers, theia} + the config → a pipeline directory. The VAE goes without its encoder (not
  needed to generate) and with the latent scaling factor that `encode` measured; Theia goes along (not needed to
  generate either), so that `encode` and `reconstruct` turn videos into the pipeline's semantic ids."""
  from landiff_jax.train.export import vae_decoder_only
  names = pipeline.PARTS + tuple(pipeline.TEXT_TOKENIZERS.values()) + ('theia',)
  require_models(models, names)
  config = config.copy_and_resolve_references()
  vae_params, config.vae = vae_decoder_only(checkpoints.load_params(os.path.join(models, 'vae')),
                                            checkpoints.load_config(os.path.join(models, 'vae')))
  with fresh_directory(dst, overwrite) as tmp:
    for name in names:
      if name == 'vae':
        checkpoints.save(os.path.join(tmp, 'vae'), part='vae', config=config.vae, params=jax.device_get(vae_params))
      else:
        shutil.copytree(os.path.join(models, name), os.path.join(tmp, name))
    pipeline.save_config(tmp, config)
  return dst
